"""Conversational image data through the processor (the collator), and bad input: one clear
error for a missing or unreadable image file, an image count that differs from the
conversation's image parts, and an architecture we do not support."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.vision.collator import VisionCollator
from fastlora_jax.vision.registry import ARCHITECTURES, arch_for
from fastlora_jax.testing.vision import shapes_dataset, tiny_processor


@pytest.fixture(scope="module")
def collator() -> VisionCollator:
    processor, image_id = tiny_processor()
    return VisionCollator(processor=processor, image_token_id=image_id)


def row(images: list, parts: int = 1) -> dict:
    content = [{"type": "image"}] * parts + [{"type": "text", "text": "Colour?"}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            "images": images}


def test_example_masks_only_the_response(collator: VisionCollator,
                                         tmp_path: pathlib.Path) -> None:
    shapes_dataset(tmp_path, n=1)
    collator.image_root = tmp_path
    ids, mask, images = collator.example(row(["shape0.png"]), "row 0")
    tok = collator.processor.tokenizer
    assert images["pixel_values"].shape == (1, 3, 28, 28)
    assert ids.count(collator.image_token_id) == 16  # (28 / 7) ** 2 patches, CLS dropped
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "red<|im_end|>\n"
    assert tok.decode(ids).startswith("<|im_start|>user\n<image>")


def test_missing_and_unreadable_images(collator: VisionCollator,
                                       tmp_path: pathlib.Path) -> None:
    collator.image_root = tmp_path
    with pytest.raises(DataError, match=r"row 3: image file .*nope\.png.* does not exist"):
        collator.example(row(["nope.png"]), "row 3")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png.* is not a readable image"):
        collator.example(row(["broken.png"]), "row 4")


def test_image_count_must_match_parts(collator: VisionCollator, tmp_path: pathlib.Path) -> None:
    shapes_dataset(tmp_path, n=2)
    collator.image_root = tmp_path
    with pytest.raises(DataError, match=r"2 image part\(s\) but the row gives 1 image"):
        collator.example(row(["shape0.png"], parts=2), "row 0")
    with pytest.raises(DataError, match=r"1 image part\(s\) but the row gives 2 image"):
        collator.example(row(["shape0.png", "shape1.png"]), "row 0")


def test_unsupported_architecture_lists_supported() -> None:
    assert {"gemma3", "llava", "llava_next", "qwen2_5_vl"} <= set(ARCHITECTURES)
    with pytest.raises(ConfigError, match=r"'mllama' is not a supported vision-language "
                                          r"architecture; supported model_types: "
                                          + re.escape(str(sorted(ARCHITECTURES)))):
        arch_for("mllama")


def test_shapes_dataset_is_real_images(tmp_path: pathlib.Path) -> None:
    from PIL import Image

    path = shapes_dataset(tmp_path, n=3)
    assert len(path.read_text().splitlines()) == 3
    pixels = np.asarray(Image.open(tmp_path / "shape0.png"))
    assert pixels.ndim == 3 and len({tuple(p) for p in pixels.reshape(-1, 3)}) == 2
