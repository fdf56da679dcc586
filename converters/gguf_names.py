"""Our parameters and config <-> llama.cpp's GGUF names, value layouts and metadata, both ways.

One table per concern, each read in both directions (export writes with the `to_*` functions,
import reads with the `from_*` ones):

- `GGUF_ARCH`: HF `model_type` -> llama.cpp architecture. Mistral is written as `llama` (llama.cpp
  has no dense `mistral` architecture; its converter does the same).
- Tensor names: `gguf_tensor_name(config, path, layer)` / `param_from_gguf_name(config, name)`.
  Our path `("layers", "self_attn", "q_proj", "weight")` of layer 3 is `blk.3.attn_q.weight`.
- Value layouts: `to_gguf_layout` / `from_gguf_layout`. Two transforms exist:
  * llama-arch rope. llama.cpp rotates adjacent pairs (2i, 2i+1) for arch `llama`, while HF
    rotates (i, i + d/2); so q_proj / k_proj rows (and biases, and a LoRA B's rows) are reordered
    within each head: view the rows as (heads, 2, d/2), swap the last two axes. Other
    architectures (NeoX-style rope in llama.cpp) keep HF's order.
  * Gemma norms. HF Gemma stores RMSNorm weights as offsets from 1 (`(1 + w)`, our
    `norm_offset`); GGUF stores the effective multiplier `1 + w`, for every norm (q/k norms too).
- Metadata: `to_gguf_metadata(config)` -> {key: value} of the architecture's hyper-parameters
  (typed with `metadata_type`), and `hf_config_from_gguf(arch, metadata, tensor_names)` -> a HF
  config.json dict that `models.registry.config_from_hf` reads.
- Extra tensors that carry rope parameters (`rope_freqs.weight` for llama3 scaling,
  `rope_factors_{long,short}.weight` for LongRoPE): `rope_tensors(config)`.

What llama.cpp cannot run the way we compute it is refused here (`check_exportable`), with one
message naming the config field: every export goes through it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from fastlora_jax.config import Activation, ModelConfig, RopeConfig, RopeKind
from fastlora_jax.errors import ExportError
from fastlora_jax.models.rope import longrope_attention_factor

log = logging.getLogger(__name__)

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "gemma": "gemma", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3"}
# The reverse: the HF model_type an architecture imports as.
MODEL_TYPE = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
              "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3"}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

# Optional tensors each architecture loads (llama.cpp's load_arch_tensors); anything else we
# would write is ignored there, so a config that needs it is refused.
_BIASES = {"llama": {"qkv", "o", "mlp"}, "gemma": {"qkv"}, "gemma2": {"qkv"}, "gemma3": {"qkv"},
           "phi3": set(), "qwen2": {"qkv"}, "qwen3": {"qkv"}}
# Layer counts llama.cpp types as the 27B Gemma, whose attention scale is (H / heads)^-0.5.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

_TOP = {("embed_tokens", "weight"): "token_embd.weight", ("norm", "weight"): "output_norm.weight",
        ("lm_head", "weight"): "output.weight"}
_BLOCK = {("input_layernorm",): "attn_norm", ("self_attn", "q_proj"): "attn_q",
          ("self_attn", "k_proj"): "attn_k", ("self_attn", "v_proj"): "attn_v",
          ("self_attn", "o_proj"): "attn_output", ("self_attn", "qkv_proj"): "attn_qkv",
          ("self_attn", "q_norm"): "attn_q_norm", ("self_attn", "k_norm"): "attn_k_norm",
          ("pre_feedforward_layernorm",): "ffn_norm",
          ("post_feedforward_layernorm",): "post_ffw_norm",
          ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
          ("mlp", "down_proj"): "ffn_down", ("mlp", "gate_up_proj"): "ffn_up"}

ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS_LONG = "rope_factors_long.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"


def gguf_arch(config: ModelConfig) -> str:
    """The llama.cpp architecture of `config` (an ExportError for families it lacks)."""
    arch = GGUF_ARCH.get(config.model_type)
    if arch is None:
        raise ExportError(f"model_type {config.model_type!r} has no llama.cpp architecture we "
                          f"export to; supported: {sorted(GGUF_ARCH)}")
    return arch


# ---------------------------------------------------------------------------------------------
# Tensor names

def gguf_tensor_name(config: ModelConfig, path: tuple[str, ...], layer: int | None) -> str:
    """GGUF name of parameter `path` (of layer `layer` when stacked)."""
    if path in _TOP:
        return _TOP[path]
    if path[0] != "layers" or layer is None:
        raise ExportError(f"parameter {'.'.join(path)!r} has no GGUF name")
    module, leaf = path[1:-1], path[-1]
    if module == ("post_attention_layernorm",):
        base = "post_attention_norm" if config.post_norms else "ffn_norm"
    elif module in _BLOCK:
        base = _BLOCK[module]
    else:
        raise ExportError(f"parameter {'.'.join(path)!r} has no GGUF name")
    return f"blk.{layer}.{base}.{leaf}"


def param_from_gguf_name(config: ModelConfig, name: str) -> tuple[tuple[str, ...], int | None]:
    """Inverse of `gguf_tensor_name`: (our path, layer or None)."""
    for path, gguf_name in _TOP.items():
        if name == gguf_name:
            return path, None
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        raise ExportError(f"GGUF tensor {name!r} is not a parameter of a {config.model_type} model")
    layer, base, leaf = int(parts[1]), parts[2], parts[3]
    if base == "ffn_norm" and not config.post_norms:
        return ("layers", "post_attention_layernorm", leaf), layer
    if base == "post_attention_norm" and config.post_norms:
        return ("layers", "post_attention_layernorm", leaf), layer
    if base == "ffn_up" and config.fused_gate_up:
        return ("layers", "mlp", "gate_up_proj", leaf), layer
    for module, candidate in _BLOCK.items():
        if candidate == base and module != ("mlp", "gate_up_proj"):
            return ("layers",) + module + (leaf,), layer
    raise ExportError(f"GGUF tensor {name!r} is not a parameter of a {config.model_type} model")


# ---------------------------------------------------------------------------------------------
# Value layouts

def _rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF half-split rotary rows -> llama.cpp adjacent-pair rows, per head (rows on axis 0)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(
        rows.shape)


def _rope_unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(
        rows.shape)


def _permuted_heads(config: ModelConfig, path: tuple[str, ...]) -> int | None:
    """Heads whose rows llama-arch rope reorders for parameter `path`, or None."""
    if gguf_arch(config) != "llama" or len(path) < 3 or path[1] != "self_attn":
        return None
    return {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(path[2])


def _is_norm(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-1] == "weight" and path[-2].endswith("norm")


def to_gguf_layout(config: ModelConfig, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """One layer's value of `path` (HF layout, float) as GGUF stores it.

    For a LoRA factor pass the B matrix [out, r] with the projection's path: its rows are
    reordered like the weight's; an A matrix [r, in] never changes.
    """
    heads = _permuted_heads(config, path)
    if heads is not None:
        value = _rope_permute(value, heads)
    if config.norm_offset and _is_norm(path):
        value = value + np.asarray(config.norm_offset, value.dtype)
    return value


def from_gguf_layout(config: ModelConfig, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Inverse of `to_gguf_layout`."""
    heads = _permuted_heads(config, path)
    if heads is not None:
        value = _rope_unpermute(value, heads)
    if config.norm_offset and _is_norm(path):
        value = value - np.asarray(config.norm_offset, value.dtype)
    return value


# ---------------------------------------------------------------------------------------------
# What llama.cpp can run

def _llama_cpp_attention_scale(config: ModelConfig, arch: str) -> float:
    if _GEMMA_27B_LAYERS.get(arch) == config.num_layers:
        return (config.hidden_size / config.num_heads) ** -0.5
    return config.head_dim ** -0.5


def check_exportable(config: ModelConfig) -> str:
    """The architecture name, after refusing what llama.cpp would compute differently."""
    arch = gguf_arch(config)
    c = config

    def refuse(what: str) -> None:
        raise ExportError(f"cannot export this {c.model_type} model to GGUF: {what}")

    gemma = arch in GEMMA_ARCHS
    if c.mlp_activation is not (Activation.GELU_TANH if gemma else Activation.SILU):
        refuse(f"mlp_activation={c.mlp_activation.value!r}; llama.cpp's {arch} uses "
               f"{'gelu (tanh)' if gemma else 'silu'}")
    if gemma and c.embed_scale is not None and not math.isclose(
            c.embed_scale, math.sqrt(c.hidden_size), rel_tol=1e-6):
        refuse(f"embed_scale={c.embed_scale}; llama.cpp's {arch} scales embeddings by "
               f"sqrt(hidden_size)")
    if not gemma and c.embed_scale is not None:
        refuse(f"embed_scale={c.embed_scale}; llama.cpp's {arch} does not scale embeddings")
    if c.norm_offset not in ((1.0,) if gemma else (0.0,)):
        refuse(f"norm_offset={c.norm_offset}")
    if not math.isclose(c.attention_scale, _llama_cpp_attention_scale(c, arch), rel_tol=1e-6):
        refuse(f"attention scale {c.attention_scale:.6g} (query_pre_attn_scalar="
               f"{c.query_pre_attn_scalar}); llama.cpp's {arch} uses "
               f"{_llama_cpp_attention_scale(c, arch):.6g} for {c.num_layers} layers")
    used = {"qkv"} if c.qkv_bias else set()
    used |= {"o"} if c.o_bias else set()
    used |= {"mlp"} if c.mlp_bias else set()
    if used - _BIASES[arch]:
        refuse(f"biases on {sorted(used - _BIASES[arch])}; llama.cpp's {arch} loads none there")
    if arch in ("gemma", "gemma2") and not c.tie_embeddings:
        refuse("tie_word_embeddings=False; llama.cpp's gemma/gemma2 always reuse the embedding "
               "as the output layer")
    if c.qk_norm != (arch in ("qwen3", "gemma3")):
        refuse(f"qk_norm={c.qk_norm}")
    if c.post_norms != (arch in ("gemma2", "gemma3")):
        refuse(f"post_norms={c.post_norms}")
    if arch == "gemma2" and (c.attn_logit_softcap is None or c.final_logit_softcap is None):
        refuse("llama.cpp's gemma2 always soft-caps attention scores and logits; set both "
               "attn_logit_softcapping and final_logit_softcapping")
    if c.attn_logit_softcap is not None and arch != "gemma2":
        refuse(f"attn_logit_softcapping={c.attn_logit_softcap} is only applied by gemma2")
    if c.final_logit_softcap is not None and arch not in ("gemma2", "gemma3"):
        refuse(f"final_logit_softcapping={c.final_logit_softcap}")
    _check_rope(c, arch, refuse)
    if c.sliding_window is not None and arch not in ("gemma2", "gemma3") and (
            c.sliding_window < c.max_position_embeddings):
        log.warning("llama.cpp's %s attends over the whole context: this model's sliding window "
                    "(%d tokens) is not applied there, so outputs match only while the context "
                    "is at most %d tokens", arch, c.sliding_window, c.sliding_window)
    return arch


def _check_rope(c: ModelConfig, arch: str, refuse: Any) -> None:
    rope = c.rope
    if rope.kind is RopeKind.DYNAMIC:
        refuse("dynamic NTK rope scaling is not implemented by llama.cpp")
    if rope.kind is RopeKind.LLAMA3 and arch != "llama":
        refuse(f"llama3 rope scaling (a rope_freqs tensor) is only read by llama.cpp's llama")
    if rope.kind is RopeKind.LONGROPE and arch not in ("phi3", "llama"):
        refuse("LongRoPE factors are only read by llama.cpp's phi3 and llama")
    if rope.partial_rotary_factor != 1.0 and arch == "llama":
        refuse("partial rotary embeddings; llama.cpp's llama rotates the whole head")
    if c.local_rope is not None and c.local_rope != c.rope:
        local = c.local_rope
        plain = RopeConfig(theta=local.theta, partial_rotary_factor=rope.partial_rotary_factor)
        if arch != "gemma3" or local != plain:
            refuse("the sliding layers' rope differs from the global layers' in a way llama.cpp "
                   "cannot express (only an unscaled base frequency, on gemma3)")


# ---------------------------------------------------------------------------------------------
# Metadata

def metadata_type(value: Any) -> str:
    """The GGUF value type we store a metadata value as (names of gguf.GGUFValueType)."""
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "UINT32"
    if isinstance(value, float):
        return "FLOAT32"
    if isinstance(value, str):
        return "STRING"
    return "ARRAY"


def rotary_dim(config: ModelConfig) -> int:
    return int(config.head_dim * config.rope.partial_rotary_factor)


def to_gguf_metadata(config: ModelConfig) -> dict[str, Any]:
    """{GGUF key: value} of `config`'s hyper-parameters (keys carry the architecture prefix)."""
    c, arch = config, check_exportable(config)
    kv: dict[str, Any] = {
        "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
        "block_count": c.num_layers, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_heads, "attention.head_count_kv": c.num_kv_heads,
        "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "rope.dimension_count": rotary_dim(c), "rope.freq_base": float(c.rope.theta),
        "vocab_size": c.vocab_size,
    }
    rope = c.rope
    if rope.kind is RopeKind.LINEAR and rope.factor not in (None, 1.0):
        kv["rope.scaling.type"] = "linear"
        kv["rope.scaling.factor"] = float(rope.factor)
    if rope.kind is RopeKind.LONGROPE:
        kv["rope.scaling.type"] = "longrope"
        kv["rope.scaling.original_context_length"] = rope.original_max_position_embeddings
        kv["rope.scaling.attn_factor"] = float(longrope_attention_factor(c))
    if arch == "phi3":
        kv["attention.sliding_window"] = c.sliding_window or 0
    if arch in ("gemma2", "gemma3"):
        swa = [c.layer_window(i) is not None for i in range(c.num_layers)]
        if any(swa):
            kv["attention.sliding_window"] = c.sliding_window
            kv["attention.sliding_window_pattern"] = swa
        if arch == "gemma3" and c.local_rope is not None:
            kv["rope.freq_base_swa"] = float(c.local_rope.theta)
        if c.attn_logit_softcap is not None:
            kv["attn_logit_softcapping"] = float(c.attn_logit_softcap)
        if c.final_logit_softcap is not None:
            kv["final_logit_softcapping"] = float(c.final_logit_softcap)
    return {f"{arch}.{k}": v for k, v in kv.items()}


def rope_tensors(config: ModelConfig) -> dict[str, np.ndarray]:
    """Float32 tensors that carry rope scaling: llama3's per-frequency divisors, LongRoPE's
    short / long factors."""
    rope = config.rope
    if rope.kind is RopeKind.LONGROPE:
        return {ROPE_FACTORS_LONG: np.asarray(rope.long_factor, np.float32),
                ROPE_FACTORS_SHORT: np.asarray(rope.short_factor, np.float32)}
    if rope.kind is not RopeKind.LLAMA3:
        return {}
    dim = rotary_dim(config)
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / inv_freq
    orig = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / rope.low_freq_factor, orig / rope.high_freq_factor
    smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor -
                                                        rope.low_freq_factor)
    divisor = 1 / ((1 - smooth) / rope.factor + smooth)
    divisor = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, rope.factor,
                                                              divisor))
    return {ROPE_FREQS: divisor.astype(np.float32)}


def hf_config_from_gguf(arch: str, metadata: Mapping[str, Any], tensor_names: set[str],
                        rope_factors: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """A HF config.json dict for a GGUF of architecture `arch` (inverse of `to_gguf_metadata`).

    `metadata` maps keys (with the arch prefix) to plain values; `tensor_names` says which optional
    tensors exist (biases, output.weight, rope factors); `rope_factors` holds the LongRoPE factor
    tensors when there are any. llama3 `rope_freqs` cannot be inverted into HF's four parameters
    uniquely and are refused here.
    """
    if arch not in MODEL_TYPE:
        raise ExportError(f"GGUF architecture {arch!r} is not supported; supported: "
                          f"{sorted(MODEL_TYPE)}")

    def get(key: str, default: Any = ...) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if default is ...:
                raise ExportError(f"GGUF metadata key {full!r} is missing")
            return default
        return metadata[full]

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    hf: dict[str, Any] = {
        "model_type": MODEL_TYPE[arch], "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim, "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(get("context_length")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if "vocab_size" in {k.split(".", 1)[1] for k in metadata if k.startswith(arch + ".")}:
        hf["vocab_size"] = int(get("vocab_size"))
    elif "tokenizer.ggml.tokens" in metadata:
        hf["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        hf["partial_rotary_factor"] = rot / head_dim
    if ROPE_FREQS in tensor_names:
        raise ExportError("GGUF llama3 rope scaling (rope_freqs.weight) is not read back")
    scaling = get("rope.scaling.type", None)
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling == "longrope":
        if rope_factors is None or {ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT} - set(rope_factors):
            raise ExportError("GGUF LongRoPE scaling without its rope_factors_long / "
                              "rope_factors_short tensors")
        hf["rope_scaling"] = {
            "rope_type": "longrope", "attention_factor": float(get("rope.scaling.attn_factor")),
            "long_factor": [float(v) for v in rope_factors[ROPE_FACTORS_LONG]],
            "short_factor": [float(v) for v in rope_factors[ROPE_FACTORS_SHORT]]}
        hf["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif scaling not in (None, "none"):
        raise ExportError(f"GGUF rope scaling {scaling!r} is not supported")
    bias = any(n.endswith("attn_q.bias") for n in tensor_names)
    if arch == "llama":
        hf["attention_bias"] = bias
        hf["mlp_bias"] = any(n.endswith("ffn_up.bias") for n in tensor_names)
        hf["hidden_act"] = "silu"
    elif arch == "gemma":
        hf["attention_bias"] = bias
        hf["hidden_act"] = "gelu_pytorch_tanh"
    elif arch == "qwen3":
        hf["attention_bias"] = bias
    elif arch == "phi3":
        window = int(get("attention.sliding_window", 0))
        hf["sliding_window"] = window or None
        hf.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if arch in ("gemma2", "gemma3"):
        pattern = get("attention.sliding_window_pattern", None)
        window = get("attention.sliding_window", None)
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["query_pre_attn_scalar"] = (hidden // heads if _GEMMA_27B_LAYERS.get(arch) ==
                                       hf["num_hidden_layers"] else head_dim)
        hf["sliding_window"] = int(window) if window else None
        if pattern is not None and not isinstance(pattern, (int, np.integer)):
            hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        hf["final_logit_softcapping"] = get("final_logit_softcapping", None)
        if arch == "gemma2":
            hf["attn_logit_softcapping"] = get("attn_logit_softcapping", 50.0)
        else:
            hf["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    return hf


def lora_tensor_names(config: ModelConfig, path: tuple[str, ...], layer: int) -> tuple[str, str]:
    """(A, B) GGUF names of the LoRA factors of projection `path` in `layer`."""
    base = gguf_tensor_name(config, path, layer)
    return base + ".lora_a", base + ".lora_b"


__all__ = ["GGUF_ARCH", "MODEL_TYPE", "check_exportable", "from_gguf_layout",
           "gguf_arch", "gguf_tensor_name", "hf_config_from_gguf", "lora_tensor_names",
           "metadata_type", "param_from_gguf_name", "rope_tensors", "rotary_dim",
           "to_gguf_layout", "to_gguf_metadata"]
