"""GGUF metadata -> our ModelConfig, strictly, for import.

The mapping itself is `gguf_names.hf_config_from_gguf` (the inverse of what the GGUF export
writes), giving a Hugging Face config.json dict that `models.registry.config_from_hf` parses; so an
imported GGUF has the config a transformers checkpoint of the model would have. This module adds
what reading a file someone else wrote needs:

- strictness, as for config.json: every `{arch}.*` key must be one the mapping reads (`ARCH_KEYS`),
  so a file whose math we would not reproduce (experts, yarn rope, per-layer head counts, an
  explicit attention scale, ...) is refused by name instead of loading into a different model.
  `general.*` (bookkeeping), `tokenizer.*` (converters/gguf_tokenizer.py) and `quantize.*`
  (llama-quantize's notes) are not model math; a split file (`split.*`) is refused;
- Llama 3 rope scaling, which llama.cpp stores as a tensor of per-frequency divisors
  (`rope_freqs.weight`), recovered into HF's four parameters (`llama3_rope`);
- the special token ids, which config.json also carries;
- errors that name the file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from fastlora_jax.config import ModelConfig, RopeKind
from fastlora_jax.converters import gguf_names as gn
from fastlora_jax.converters.gguf_read import GGUFFile
from fastlora_jax.errors import ConfigError, ExportError
from fastlora_jax.models.rope import longrope_attention_factor
from fastlora_jax.models.registry import config_from_hf

_COMMON_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.finetuned"})
_WINDOWED = frozenset({"attention.sliding_window", "attention.sliding_window_pattern",
                       "attn_logit_softcapping", "final_logit_softcapping"})
# {arch}.* keys that hf_config_from_gguf reads (or that do not change the math), per architecture
ARCH_KEYS = {
    "llama": _COMMON_KEYS | {"rope.scaling.original_context_length"},
    "gemma": _COMMON_KEYS, "qwen2": _COMMON_KEYS, "qwen3": _COMMON_KEYS,
    "gemma2": _COMMON_KEYS | _WINDOWED,
    "gemma3": _COMMON_KEYS | _WINDOWED | {"rope.freq_base_swa"},
    "phi3": _COMMON_KEYS | {"attention.sliding_window", "rope.scaling.original_context_length",
                            "rope.scaling.attn_factor"},
}
NOT_MODEL_MATH = ("general.", "tokenizer.", "quantize.")
ROPE_TENSORS = (gn.ROPE_FREQS, gn.ROPE_FACTORS_LONG, gn.ROPE_FACTORS_SHORT)
# config.json token ids <- GGUF tokenizer metadata
TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
             "pad_token_id": "padding_token_id", "unk_token_id": "unknown_token_id"}


def read_gguf_config(g: GGUFFile) -> ModelConfig:
    """The ModelConfig of the model in `g` (strict; see module doc)."""
    source = f"{str(g.path)!r} (GGUF metadata)"
    config = config_from_hf(hf_config_of(g, source), source=source)
    rope = config.rope
    if rope.kind is RopeKind.LONGROPE and rope.attention_factor is not None:
        # the file always stores LongRoPE's attention factor; keep it only where it is not the
        # one transformers derives (a float32 copy of the derived value is the derived value)
        derived = longrope_attention_factor(
            config, dataclasses.replace(rope, attention_factor=None))
        if math.isclose(rope.attention_factor, derived, rel_tol=1e-6):
            config = dataclasses.replace(
                config, rope=dataclasses.replace(rope, attention_factor=None))
    if gn.ROPE_FREQS in g.tensors:  # the recovered Llama 3 parameters give the file's divisors
        stored = g.dequantize(gn.ROPE_FREQS)
        if not np.allclose(gn.rope_tensors(config)[gn.ROPE_FREQS], stored, rtol=1e-5, atol=1e-6):
            raise _not_llama3(source, stored)
    return config


def hf_config_of(g: GGUFFile, source: str) -> dict[str, Any]:
    """The HF config.json dict of the model in `g`."""
    arch = g.arch
    if g.value("general.type", "model") == "adapter":
        raise ConfigError(f"{source}: this is a GGUF LoRA adapter (for llama.cpp's --lora), not a "
                          f"model; load its base model instead, and a PEFT adapter folder with "
                          f"model.load_adapter")
    if arch not in ARCH_KEYS:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported; supported "
                          f"architectures: {sorted(ARCH_KEYS)} (llama covers Llama, SmolLM2 and "
                          f"Mistral files)")
    _check_keys(g, arch, source)
    metadata = {k: g.value(k) for k in g.keys() if k.startswith(arch + ".")}
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv")
    if isinstance(kv_heads, list):
        raise ConfigError(f"{source}: '{arch}.attention.head_count_kv' varies per layer "
                          f"({kv_heads[:8]}…); one count for every layer is supported")
    key_length = metadata.get(f"{arch}.attention.key_length")
    if metadata.get(f"{arch}.attention.value_length", key_length) != key_length:
        raise ConfigError(f"{source}: '{arch}.attention.value_length' differs from key_length "
                          f"{key_length}; only equal key and value head widths are supported")
    if f"{arch}.vocab_size" not in metadata and "token_embd.weight" in g.tensors:
        metadata[f"{arch}.vocab_size"] = g.shape("token_embd.weight")[0]
    factors = {name: g.dequantize(name) for name in (gn.ROPE_FACTORS_LONG, gn.ROPE_FACTORS_SHORT)
               if name in g.tensors}
    tensors = set(g.tensors) - {gn.ROPE_FREQS}
    try:
        hf = gn.hf_config_from_gguf(arch, metadata, tensors, factors or None)
    except ExportError as err:
        raise ConfigError(f"{source}: {err}") from None
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, int) and "layer_types" not in hf:
        # llama.cpp's period form: layer i is global when i % n == n - 1 (n = 0: none is)
        hf["layer_types"] = ["full_attention" if pattern and i % pattern == pattern - 1 else
                             "sliding_attention" for i in range(hf["num_hidden_layers"])]
    if gn.ROPE_FREQS in g.tensors:
        if "rope_scaling" in hf:
            raise ConfigError(f"{source}: rope_freqs.weight together with rope scaling "
                              f"{hf['rope_scaling']['rope_type']!r} is not supported")
        rotary = round(hf["head_dim"] * hf.get("partial_rotary_factor", 1.0))
        original = metadata.get(f"{arch}.rope.scaling.original_context_length", 8192)
        hf["rope_scaling"] = llama3_rope(g.dequantize(gn.ROPE_FREQS), hf["rope_theta"], rotary,
                                         original, source)
    for name, key in TOKEN_IDS.items():
        value = g.value(f"tokenizer.ggml.{key}", None)
        if value is not None:
            hf[name] = value
    return hf


def _check_keys(g: GGUFFile, arch: str, source: str) -> None:
    known = ARCH_KEYS[arch]
    for name in g.keys():
        if name.startswith(NOT_MODEL_MATH):
            continue
        if name.startswith("split."):
            raise ConfigError(f"{source}: the model is split over several GGUF files ({name!r}); "
                              f"merge them first (llama.cpp's `llama-gguf-split --merge`)")
        if not (name.startswith(arch + ".") and name[len(arch) + 1:] in known):
            raise ConfigError(
                f"{source}: metadata key {name!r} (= {_short(g.value(name))}) is not understood "
                f"for GGUF architecture {arch!r}; fastlora_jax refuses files it cannot reproduce "
                f"exactly. Keys read for {arch!r}: {sorted(f'{arch}.{k}' for k in known)}")


def llama3_rope(divisors: np.ndarray, theta: float, rotary: int, original: int,
                source: str) -> dict[str, Any]:
    """Llama 3 rope_scaling from llama.cpp's `rope_freqs` tensor (per-frequency divisors).

    The divisors are 1 for high frequencies, `factor` for low ones and `1 / ((1 - s) / factor + s)`
    between, with `s = (original / wavelength - low) / (high - low)` linear in 1 / wavelength. The
    factor is the largest divisor; a line through the smooth band gives `high - low` and `low` for
    the given `original` context (only the ratios matter: scaling all three together gives the
    same divisors). `read_gguf_config` checks the result by recomputing the divisors.
    """
    divisors = np.asarray(divisors, np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, rotary, 2, dtype=np.float64) / rotary)
    wavelen = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    high_band = divisors <= 1 + 1e-6
    low_band = divisors >= factor * (1 - 1e-6)
    smooth = ~high_band & ~low_band
    fail = _not_llama3(source, divisors)
    if factor <= 1 or len(divisors) != rotary // 2:
        raise fail
    if smooth.sum() >= 2:
        s = (1 / divisors[smooth] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[smooth], s, 1)
        span = original / slope
        low, high = -intercept * span, -intercept * span + span
    elif smooth.sum() == 0 and high_band.any():
        # no smooth band: thresholds anywhere between the two groups give the same divisors
        last_high, first_low = wavelen[high_band].max(), wavelen[low_band].min()
        r = (first_low / last_high) ** (1 / 3)
        low, high = original * r / first_low, original / (last_high * r)
    else:
        raise fail
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 6),
            "high_freq_factor": round(float(high), 6),
            "original_max_position_embeddings": int(original)}


def _not_llama3(source: str, divisors: np.ndarray) -> ConfigError:
    return ConfigError(f"{source}: rope_freqs.weight does not follow Llama 3 rope scaling "
                       f"(divisors {np.round(divisors, 4).tolist()[:8]}…); it is not supported")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
