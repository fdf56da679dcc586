"""The table of supported model families, by HF `model_type`."""

from __future__ import annotations

from fastlora_jax.errors import ConfigError
from fastlora_jax.models.family import Family
from fastlora_jax.models.llama import LLAMA

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA,)}


def family_for(model_type: object, *, source: str = "config.json") -> Family:
    """The Family of `model_type`, or a ConfigError listing the supported ones."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported model_types: "
            f"{sorted(FAMILIES)}")
    return family
