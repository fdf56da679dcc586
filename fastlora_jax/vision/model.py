"""`VisionLM`, the vision-language model object users hold (`fastlora_jax.api.FastVisionModel`
builds it): the architecture record, its config, the frozen and adapter trees, the processor; the
math is `vision/forward.py`'s.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.models.decoder import Params, frozen_project
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.checkpoint import load_vlm_adapter, save_vlm_adapter, save_vlm_merged
from fastlora_jax.vision.forward import forward_jit
from fastlora_jax.vision.lora import VisionLoraSpec


class VisionLM:
    """A vision-language model: `model(input_ids=..., pixel_values=...)` -> logits [B, T, V].

    Holds the architecture record, its config, the frozen tree {"language", "vision"} and the
    adapters ({"language", "vision"} LoRA trees with their `VisionLoraSpec`), and the checkpoint's
    processor (for the chat template, the images and the exports).
    """

    def __init__(self, arch: VisionArch, config: Any, params: Params, *,
                 max_seq_length: int = 2048, name_or_path: str = "",
                 processor: Any = None) -> None:
        self.arch = arch
        self.config = config
        self.frozen = params
        self.max_seq_length = max_seq_length
        self.name_or_path = name_or_path
        self.processor = processor
        self.lora_spec: VisionLoraSpec | None = None
        self.lora: Params | None = None

    @property
    def text_config(self) -> Any:
        return self.config.text

    def params(self) -> Params:
        return self.frozen

    def lora_params(self) -> Params | None:
        return self.lora

    def set_adapter(self, spec: VisionLoraSpec, lora: Params) -> None:
        self.lora_spec, self.lora = spec, lora

    def load_adapter(self, folder: str | pathlib.Path) -> None:
        """Load a PEFT adapter folder (written by us or by `peft` for the transformers class)."""
        self.set_adapter(*load_vlm_adapter(folder, self.arch, self.config))

    def batch(self, inputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The arrays the forward reads, from a processor output (numpy arrays or lists),
        checked: as many image tokens as the images give features."""
        if "input_ids" not in inputs:
            raise DataError("inputs lack 'input_ids'; pass the processor's output "
                            "(processor(text=..., images=..., return_tensors='np'))")
        out = {"input_ids": jnp.asarray(np.asarray(inputs["input_ids"]), jnp.int32)}
        mask = inputs.get("attention_mask")
        if mask is not None and not np.asarray(mask).all():
            # padding attends only to padding, real tokens only to real ones (transformers'
            # attention_mask); positions stay 0..T-1 as in transformers' forward
            out["segment_ids"] = jnp.asarray(np.asarray(mask), jnp.int32)
        for key in self.arch.input_keys:
            if key in inputs and inputs[key] is not None:
                out[key] = jnp.asarray(np.asarray(inputs[key]))
        if self.arch.host_inputs is not None:
            extra = self.arch.host_inputs(self.config, {k: np.asarray(v) for k, v in
                                                        inputs.items() if v is not None})
            out.update({k: jnp.asarray(v) for k, v in extra.items()})
        check_image_tokens(self, out)
        return out

    def __call__(self, input_ids: Any = None, *, attention_impl: Any = None,
                 **inputs: Any) -> jax.Array:
        """Logits [B, T, V] for input_ids [B, T] and the processor's image arrays."""
        batch = self.batch(dict(inputs, input_ids=input_ids))
        return forward_jit(self.arch, self.config, self.lora_spec, self.frozen, self.lora,
                           batch, attention_impl=attention_impl)

    def generate(self, inputs: Mapping[str, Any], max_new_tokens: int = 32, **options: Any
                 ) -> Any:
        """Greedy or sampled continuation of one processor output (`vision/generate.py`)."""
        from fastlora_jax.vision.generate import generate

        return generate(self, inputs, max_new_tokens=max_new_tokens, **options)

    def save_pretrained(self, folder: str | pathlib.Path, processor: Any = None, *,
                        overwrite: bool = False) -> pathlib.Path:
        """The PEFT adapter (both parts' modules under the transformers class's names)."""
        return save_vlm_adapter(folder, self.arch, self.lora_spec, self.lora,
                                base_model_name_or_path=self.name_or_path or None,
                                processor=processor, overwrite=overwrite)

    def save_pretrained_merged(self, folder: str | pathlib.Path, processor: Any = None, *,
                               save_method: str = "merged_16bit", dtype: Any = None,
                               max_shard_size: int | str = "5GB",
                               overwrite: bool = False) -> pathlib.Path:
        """`merged_16bit`: the whole model with adapters folded in; `lora`: the adapter only."""
        if save_method == "lora":
            return self.save_pretrained(folder, processor, overwrite=overwrite)
        if save_method != "merged_16bit":
            raise ConfigError(f"save_method={save_method!r} must be 'merged_16bit' or 'lora'")
        return save_vlm_merged(folder, self.arch, self.config, self.frozen, self.lora,
                               self.lora_spec, dtype=dtype, processor=processor,
                               max_shard_size=max_shard_size, overwrite=overwrite)


def check_image_tokens(model: VisionLM, batch: Mapping[str, Any]) -> None:
    """One DataError when the placeholders and the images' features disagree in number."""
    tokens = int(np.sum(np.asarray(batch["input_ids"]) == model.config.image_token_id))
    if "pixel_values" not in batch:
        if tokens:
            raise DataError(f"input_ids hold {tokens} image placeholder token(s) but no "
                            f"pixel_values were given; pass the images to the processor")
        return
    shapes = jax.eval_shape(
        lambda b: model.arch.image_features(model.config, model.frozen["vision"], None,
                                            frozen_project, b, None, None),
        {k: v for k, v in batch.items() if k != "input_ids"})
    if shapes.shape[0] != tokens:
        raise DataError(f"input_ids hold {tokens} image placeholder token(s) but the images "
                        f"give {shapes.shape[0]} feature rows; each image needs its "
                        f"placeholders (build inputs with the checkpoint's processor)")


def load_processor(folder: pathlib.Path, arch: VisionArch | None = None) -> Any:
    """The checkpoint's AutoProcessor (chat template, tokenizer and image processor), or what
    the architecture's `load_processor` builds."""
    from fastlora_jax.errors import CheckpointError

    try:
        from transformers import AutoProcessor

        if arch is not None and arch.load_processor is not None:
            return arch.load_processor(folder)
        return AutoProcessor.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many types for missing / broken files
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(f"the processor files in {str(folder)!r} could not be loaded "
                              f"({type(err).__name__}: {reason}); a vision-language checkpoint "
                              f"needs its processor (preprocessor_config.json and tokenizer "
                              f"files)") from None


__all__ = ["VisionLM", "check_image_tokens", "load_processor"]
