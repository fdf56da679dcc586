"""The table of supported model families, by HF `model_type`."""

from __future__ import annotations

from fastlora_jax.errors import ConfigError
from fastlora_jax.models.family import Family
from fastlora_jax.models.gemma import GEMMA
from fastlora_jax.models.gemma2 import GEMMA2
from fastlora_jax.models.gemma3 import GEMMA3
from fastlora_jax.models.llama import LLAMA
from fastlora_jax.models.mistral import MISTRAL
from fastlora_jax.models.phi3 import PHI3
from fastlora_jax.models.qwen2 import QWEN2
from fastlora_jax.models.qwen3 import QWEN3

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (LLAMA, MISTRAL, GEMMA, GEMMA2, GEMMA3, PHI3, QWEN2, QWEN3)}


def family_for(model_type: object, *, source: str = "config.json") -> Family:
    """The Family of `model_type`, or a ConfigError listing the supported ones."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported model_types: "
            f"{sorted(FAMILIES)}")
    return family
