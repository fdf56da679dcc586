"""The table of supported vision-language architectures, by HF `model_type`."""

from __future__ import annotations

from typing import Any, Mapping

from fastlora_jax.errors import ConfigError
from fastlora_jax.models.registry import lookup_model_type
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.gemma3_mm import GEMMA3_VLM
from fastlora_jax.vision.llava import LLAVA
from fastlora_jax.vision.llava_next import LLAVA_NEXT
from fastlora_jax.vision.qwen2_5_vl import QWEN2_5_VL

ARCHITECTURES: dict[str, VisionArch] = {a.model_type: a for a in (LLAVA, LLAVA_NEXT, GEMMA3_VLM,
                                                                 QWEN2_5_VL)}


def arch_for(model_type: object, *, source: str = "config.json") -> VisionArch:
    """The VisionArch of `model_type`, or a ConfigError listing the supported ones."""
    return lookup_model_type(ARCHITECTURES, model_type, source=source,
                             kind="vision-language architecture")


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> tuple[VisionArch, Any]:
    """(architecture, its config) of a vision-language config.json dict, strictly read."""
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, found {type(hf).__name__}")
    arch = arch_for(hf.get("model_type"), source=source)
    return arch, arch.parse_config(hf, source)
