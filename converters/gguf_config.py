"""GGUF metadata -> a Hugging Face config.json dict, which `ModelConfig.from_hf_config` then parses.

Going through the HF dict keeps one strict parser for both sources and gives an imported GGUF the
same config.json a transformers checkpoint of the model would have. Reading is strict as for
config.json: every `{arch}.*` key must be one this module reads for that arch, so a file whose
math we would not reproduce (experts, yarn rope, per-layer head counts, ...) is refused by name
instead of loading into a different model. `general.*` (bookkeeping), `tokenizer.*` (read by
converters/gguf_tokenizer.py) and `quantize.*` (llama-quantize's notes) are not model math.

llama.cpp's architecture names map to our families as its converter writes them: every
`LlamaForCausalLM` / `MistralForCausalLM` checkpoint (Llama, SmolLM2, Mistral) is arch `llama`,
and the Gemma 3 text model is arch `gemma3`. Values the files leave out are read as llama.cpp
reads them (Gemma 2/3 attention scale; Gemma 3's local rope base of 10000).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastlora_jax.converters.gguf_read import GGUFFile
from fastlora_jax.errors import ConfigError

# llama.cpp architecture -> our model_type
ARCH_MODEL_TYPE = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
                   "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3"}

_COMMON_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned"})
_GEMMA2_KEYS = frozenset({"attention.sliding_window", "attention.scale", "attn_logit_softcapping",
                          "final_logit_softcapping"})
# {arch}.* keys read per arch, beyond the common ones
_ARCH_KEYS = {
    "llama": frozenset(), "qwen2": frozenset(), "qwen3": frozenset(),
    "gemma": frozenset({"attention.scale"}),
    "gemma2": _GEMMA2_KEYS,
    "gemma3": _GEMMA2_KEYS | {"attention.sliding_window_pattern", "rope.freq_base_swa"},
    "phi3": frozenset({"attention.sliding_window", "rope.scaling.attn_factor"}),
}
NOT_MODEL_MATH = ("general.", "tokenizer.", "quantize.")
# Tensors that carry rope parameters rather than weights (read here, not loaded as parameters).
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# llama.cpp scales Gemma 2 / 3 27B attention by (hidden / heads) ** -0.5, every other size by
# head_dim ** -0.5, telling 27B apart by its layer count.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The HF config.json dict of the model in `g` (strict, see module doc)."""
    arch = g.arch
    source = f"{str(g.path)!r} (GGUF metadata)"
    if arch not in ARCH_MODEL_TYPE:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported; supported "
                          f"architectures: {sorted(ARCH_MODEL_TYPE)} (llama covers Llama, "
                          f"SmolLM2 and Mistral files)")
    _check_keys(g, arch, source)

    def key(suffix: str, default: Any = ...) -> Any:
        return g.value(f"{arch}.{suffix}", default)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ConfigError(f"{source}: '{arch}.attention.head_count_kv' varies per layer "
                          f"({kv_heads[:8]}…); only one count for every layer is supported")
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{source}: '{arch}.attention.value_length' = "
                          f"{key('attention.value_length')} differs from key_length {head_dim}; "
                          f"only equal key and value head widths are supported")
    layers = key("block_count")
    rows = g.shape("token_embd.weight")[0] if "token_embd.weight" in g.tensors else None
    vocab = key("vocab_size", rows)
    if rows is not None and vocab != rows:
        raise ConfigError(f"{source}: '{arch}.vocab_size' = {vocab} but token_embd.weight has "
                          f"{rows} rows; the file is inconsistent — re-export it")
    hf: dict[str, Any] = dict(
        model_type=ARCH_MODEL_TYPE[arch], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=key("feed_forward_length"), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=key("context_length"),
        tie_word_embeddings="output.weight" not in g.tensors)
    for name, meta in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        if f"tokenizer.ggml.{meta}" in g.reader.fields:
            hf[name] = g.value(f"tokenizer.ggml.{meta}")
    rotary = key("rope.dimension_count", head_dim)
    if arch == "phi3":
        hf["partial_rotary_factor"] = rotary / head_dim
    elif rotary != head_dim:
        raise ConfigError(f"{source}: '{arch}.rope.dimension_count' = {rotary} differs from the "
                          f"head width {head_dim}; partial rotary is only read for phi3")
    hf.update(_rope(g, arch, key, head_dim, source))
    has = lambda name: f"blk.0.{name}" in g.tensors  # noqa: E731
    if arch == "llama":
        hf.update(hidden_act="silu", attention_bias=has("attn_q.bias"), mlp_bias=has("ffn_up.bias"))
    elif arch in ("qwen2", "qwen3"):
        hf["hidden_act"] = "silu"
        if arch == "qwen3":
            hf["attention_bias"] = has("attn_q.bias")
    elif arch == "phi3":
        window = key("attention.sliding_window", 0)
        hf.update(hidden_act="silu", sliding_window=window or None)
    else:
        hf.update(_gemma(g, arch, key, hidden, heads, head_dim, layers))
    return hf


def _check_keys(g: GGUFFile, arch: str, source: str) -> None:
    known = _COMMON_KEYS | _ARCH_KEYS[arch]
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
                f"exactly. Keys read for {arch!r}: "
                f"{sorted(f'{arch}.{k}' for k in known)}")


def _rope(g: GGUFFile, arch: str, key: Any, head_dim: int, source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling (v4 dialect) from the rope keys and rope tensors."""
    out: dict[str, Any] = {"rope_theta": key("rope.freq_base", 10000.0)}
    kind = key("rope.scaling.type", "none")
    if arch == "phi3" and "rope_factors_long.weight" in g.tensors:
        long = g.dequantize("rope_factors_long.weight")
        short = g.dequantize("rope_factors_short.weight")
        original = key("rope.scaling.original_context_length", key("context_length"))
        scaling = {"rope_type": "longrope", "long_factor": long.tolist(),
                   "short_factor": short.tolist()}
        scale = key("context_length") / original
        derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        stored = key("rope.scaling.attn_factor", derived)
        if abs(stored - derived) > 1e-6:  # HF derives it; keep the file's when it differs
            scaling["attention_factor"] = stored
        out.update(rope_scaling=scaling, original_max_position_embeddings=original)
        return out
    if arch == "phi3":
        out["original_max_position_embeddings"] = key("rope.scaling.original_context_length",
                                                      key("context_length"))
    if "rope_freqs.weight" in g.tensors:
        if kind not in ("none", "linear") or key("rope.scaling.factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: rope_freqs.weight together with rope scaling "
                              f"{kind!r} is not supported")
        out["rope_scaling"] = llama3_rope(g.dequantize("rope_freqs.weight"), out["rope_theta"],
                                          head_dim, key("rope.scaling.original_context_length",
                                                        8192), source)
        return out
    if kind == "none":
        return out
    if kind != "linear":
        raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported; supported: "
                          f"none, linear, llama3 (rope_freqs), phi3 longrope")
    out["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return out


def llama3_rope(divisors: np.ndarray, theta: float, head_dim: int, original: int,
                source: str) -> dict[str, Any]:
    """Llama 3.1-style rope_scaling from llama.cpp's `rope_freqs` tensor (per-frequency divisors).

    The divisors are 1 for high frequencies, `factor` for low ones and `1 / ((1 - s) / factor + s)`
    between, with `s = (original / wavelength - low) / (high - low)` linear in 1 / wavelength. The
    factor is the largest divisor; the smooth band's line gives `high - low` and `low` for the
    given `original` context (only the ratios matter: scaling all three together changes
    nothing). The result is checked by recomputing the divisors.
    """
    divisors = np.asarray(divisors, np.float64)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    smooth = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    fail = ConfigError(f"{source}: rope_freqs.weight does not follow Llama 3 rope scaling "
                       f"(divisors {np.round(divisors, 4).tolist()[:8]}…); it is not supported")
    if factor <= 1 or len(divisors) != head_dim // 2:
        raise fail
    if smooth.sum() >= 2:
        s = (1 / divisors[smooth] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[smooth], s, 1)
        span = original / slope
        low, high = -intercept * span, -intercept * span + span
    elif smooth.sum() == 0 and (divisors <= 1 + 1e-6).any():
        # no smooth band: any thresholds between the two groups give the same divisors
        last_high = wavelen[divisors <= 1 + 1e-6].max()
        first_low = wavelen[divisors >= factor * (1 - 1e-6)].min()
        r = (first_low / last_high) ** (1 / 3)
        low, high = original * r / first_low, original / (last_high * r)
    else:
        raise fail
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 6),
               "high_freq_factor": round(float(high), 6),
               "original_max_position_embeddings": original}
    if not np.allclose(llama3_divisors(scaling, wavelen), divisors, rtol=1e-5, atol=1e-6):
        raise fail
    return scaling


def llama3_divisors(scaling: dict[str, Any], wavelen: np.ndarray) -> np.ndarray:
    """The per-frequency divisors that Llama 3 rope scaling applies (transformers' formula)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > original / low, factor, out)
    return np.where(wavelen < original / high, 1.0, out)


def _gemma(g: GGUFFile, arch: str, key: Any, hidden: int, heads: int, head_dim: int,
           layers: int) -> dict[str, Any]:
    """Gemma 1/2/3 keys: activation, attention scale, windows, softcaps, Gemma 3's local rope."""
    act = "hidden_act" if arch == "gemma" else "hidden_activation"
    out: dict[str, Any] = {act: "gelu_pytorch_tanh",
                           "attention_bias": f"blk.0.attn_q.bias" in g.tensors}
    if arch == "gemma":
        return out
    scale = key("attention.scale", None)
    if scale is not None:
        out["query_pre_attn_scalar"] = round(scale ** -2)
    else:
        out["query_pre_attn_scalar"] = (hidden // heads if layers == _GEMMA_27B_LAYERS[arch]
                                        else head_dim)
    out["sliding_window"] = key("attention.sliding_window", None)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = key(name, None)
        if value is not None:
            out[name] = value
    if arch == "gemma3":
        pattern = key("attention.sliding_window_pattern", None)
        if isinstance(pattern, list):
            out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif pattern is not None:
            out["sliding_window_pattern"] = pattern
        out["rope_local_base_freq"] = key("rope.freq_base_swa", 10000.0)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
