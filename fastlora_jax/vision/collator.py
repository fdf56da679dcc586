"""Conversational image data -> training rows, through the checkpoint's processor.

A row (TRL / Unsloth's vision format) is {"messages": [...], "images": [...]}: each turn's
`content` is a string or a list of parts {"type": "text", "text": ...} / {"type": "image"}
(optionally {"type": "image", "image": <path or PIL image>} carrying its own image); "images"
lists the images of the row's image parts in order, as file paths (relative to `image_root`,
default the data file's folder) or PIL images. The processor's chat template renders the
conversation, the processor expands each image part into its placeholder tokens and turns the
images into pixel arrays (transformers' image processor: no preprocessing of our own).

Rows for the trainer: `fastlora_jax/train/vision_data.py`. Labels: with
`train_on_responses_only` only assistant turns are trained; each turn's tokens are found by
rendering (and processing) the conversation up to it, as for text chat data. Rows are padded,
never packed (an image's tokens must stay in one row); examples may hold any number of images
(none included): each row's image arrays are padded to the dataset's most images (or, for
Qwen2.5-VL, patch rows), and the model reads each row's images into that row only.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import numpy as np

from fastlora_jax.errors import ConfigError, DataError


def _image_parts(messages: list[dict[str, Any]]) -> list[Any]:
    """One entry per {"type": "image"} part in order: its inline image, or None."""
    out = []
    for turn in messages:
        content = turn.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    out.append(part.get("image", part.get("path", part.get("url"))))
    return out


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of turns, found "
                        f"{repr(messages)[:80]}")
    for turn in messages:
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not (
                isinstance(content, str) or (isinstance(content, list) and all(
                    isinstance(p, dict) and p.get("type") in ("text", "image")
                    for p in content))):
            raise DataError(f"{where}: every turn must be {{'role': str, 'content': str or a "
                            f"list of {{'type': 'text' | 'image', ...}} parts}}, found "
                            f"{repr(turn)[:80]}")
    return messages


def load_image(source: Any, root: pathlib.Path | None, where: str) -> Any:
    """A PIL RGB image from a PIL image or a file path (relative paths under `root`)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, pathlib.Path)):
        raise DataError(f"{where}: an image must be a file path or a PIL image, found "
                        f"{type(source).__name__}")
    path = pathlib.Path(source)
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise DataError(f"{where}: image file {str(path)!r} does not exist; fix the path "
                        f"(relative paths are read from {str(root) if root else 'the cwd'!r})")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where}: image file {str(path)!r} is not a readable image ({err}); "
                        f"replace or remove it") from None


# Processor outputs about the text, not the images.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


def _image_arrays(processed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    out = {k: v for k, v in processed.items() if k not in _TEXT_KEYS}
    return out if "pixel_values" in out else None


@dataclasses.dataclass
class VisionCollator:
    """Builds the training rows of a vision-language model from conversational image rows.

    processor: the checkpoint's processor (from `FastVisionModel.from_pretrained`);
    image_token_id: the model's placeholder id (to check each row's images survive truncation);
    image_root: the folder relative image paths are read from;
    image_arrays: what an example's image arrays become in its training row (the
      architecture's `example_arrays`), or None.
    """

    processor: Any
    image_token_id: int
    train_on_responses_only: bool = True
    image_root: pathlib.Path | None = None
    image_arrays: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    def _arrays(self, processed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        arrays = _image_arrays(processed)
        if arrays is None or self.image_arrays is None:
            return arrays
        return self.image_arrays(arrays)

    def _process(self, messages: list[dict[str, Any]], images: list[Any], where: str, *,
                 add_generation_prompt: bool) -> dict[str, np.ndarray]:
        import jinja2

        try:
            text = self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as err:
            raise DataError(f"{where}: the processor's chat template refused the conversation "
                            f"({err})") from None
        out = self.processor(text=[text], images=images or None, return_tensors="np",
                             add_special_tokens=False)
        return {k: np.asarray(v) for k, v in out.items()}

    def example(self, row: dict[str, Any], where: str
                ) -> tuple[list[int], list[bool], dict[str, np.ndarray] | None]:
        """(token ids, train mask, the processor's image arrays or None) of one row: at least
        pixel_values ([images, C, H, W]; Qwen2.5-VL: patch rows [patches, K] and
        image_grid_thw [images, 3])."""
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where}: a vision row needs 'messages' (and 'images')")
        messages = _check_messages(row["messages"], where)
        parts = _image_parts(messages)
        listed = row.get("images") or []
        if not isinstance(listed, (list, tuple)):
            listed = [listed]
        sources = [p for p in parts if p is not None] or list(listed)
        if len(sources) != len(parts):
            raise DataError(f"{where}: the conversation has {len(parts)} image part(s) but the "
                            f"row gives {len(sources)} image(s); give one image per "
                            f"{{'type': 'image'}} part")
        images = [load_image(s, self.image_root, where) for s in sources]
        full = self._process(messages, images, where, add_generation_prompt=False)
        ids = full["input_ids"][0].tolist()
        if not self.train_on_responses_only:
            return ids, [True] * len(ids), self._arrays(full)
        mask = [False] * len(ids)
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = messages[:i]
            n_before = len(_image_parts(before))
            start = len(self._process(before, images[:n_before], where,
                                      add_generation_prompt=True)["input_ids"][0]) if i else 0
            n_upto = len(_image_parts(messages[:i + 1]))
            end = self._process(messages[:i + 1], images[:n_upto], where,
                                add_generation_prompt=False)["input_ids"][0].tolist()
            if end != ids[:len(end)]:
                raise DataError(f"{where}: the chat template does not render a conversation's "
                                f"prefix as a prefix of the whole; train_on_responses_only "
                                f"cannot locate assistant turns with this template")
            for j in range(start, len(end)):
                mask[j] = True
        return ids, mask, self._arrays(full)


def vision_collator(model: Any, processor: Any, *, train_on_responses_only: bool = True,
                    image_root: str | pathlib.Path | None = None) -> VisionCollator:
    """The collator for `model` (a `VisionLM`) and its processor."""
    if processor is None or not hasattr(processor, "image_processor"):
        raise ConfigError("a vision collator needs the checkpoint's processor (the second value "
                          "FastVisionModel.from_pretrained returns)")
    hook = model.arch.example_arrays
    return VisionCollator(processor=processor, image_token_id=model.config.image_token_id,
                          train_on_responses_only=train_on_responses_only,
                          image_root=None if image_root is None else pathlib.Path(image_root),
                          image_arrays=None if hook is None else functools.partial(
                              hook, model.config))


__all__ = ["VisionCollator", "vision_collator", "load_image"]
