"""The table of supported model families, by HF `model_type`, and `config.json` through it.

`config_from_hf` / `config_to_hf` are the two directions between a Hugging Face config dict and
a `ModelConfig`: the family named by `model_type` reads (or writes) its own keys, and the harmless
keys travel verbatim in `ModelConfig.extras`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, TypeVar

from fastlora_jax.config import MAX_LAYERS, ModelConfig, _Reader
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


Entry = TypeVar("Entry")


def lookup_model_type(table: Mapping[str, Entry], model_type: object, *, source: str,
                      kind: str) -> Entry:
    """`table[model_type]`, or a ConfigError naming `source`, the value and the supported
    model_types (`kind`: what an entry is, for the message)."""
    entry = table.get(model_type) if isinstance(model_type, str) else None
    if entry is None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a supported {kind}; "
                          f"supported model_types: {sorted(table)}")
    return entry


def family_for(model_type: object, *, source: str = "config.json") -> Family:
    """The Family of `model_type`, or a ConfigError listing the supported ones."""
    return lookup_model_type(FAMILIES, model_type, source=source, kind="model family")


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Parse a HF config dict strictly; `source` names the file in error messages."""
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, found {type(hf).__name__}")
    family = family_for(hf.get("model_type"), source=source)
    layers = hf.get("num_hidden_layers")  # checked first: families build per-layer lists
    if isinstance(layers, int) and not 0 < layers <= MAX_LAYERS:
        raise ConfigError(f"{source}: num_hidden_layers={layers} must be between 1 and "
                          f"{MAX_LAYERS}")
    reader = _Reader(dict(hf), source)
    fields = family.parse_config(reader)
    reader.finish(family.model_type, family.harmless_keys)
    return ModelConfig(**fields, extras=reader.extras())


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict of `config` (v4 rope dialect); inverse of `config_from_hf`."""
    family = family_for(config.model_type)
    out: dict[str, Any] = {k: json.loads(v) for k, v in config.extras}
    out.update(family.unparse_config(config))
    out["model_type"] = config.model_type
    out["architectures"] = [family.architecture]
    return dict(sorted(out.items()))
