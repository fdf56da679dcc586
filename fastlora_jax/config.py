"""`ModelConfig`: the one description of a decoder-only model that every stage reads.

This module also holds the strict reader of Hugging Face `config.json` keys (`_Reader`) that each
family's parser uses; the family table itself, and the entry points `config_from_hf` /
`config_to_hf`, live in `fastlora_jax/models/registry.py`, so that this module imports nothing
above it. Parsing is strict: every key must be either understood (it changes the math, and becomes
a field) or on the documented allow-list of harmless keys (`HARMLESS_KEYS`, kept verbatim in
`extras` so that `config_to_hf` can write it back). Anything else is a `ConfigError` naming the
key. Both rope dialects are read: the v4 one (`rope_theta` + `rope_scaling`, whose kind is spelt
`type` or `rope_type`) and the transformers v5 one (`rope_parameters`). `config_to_hf` writes the
v4 dialect, which transformers 4.x and 5.x both read.

Family quirks are fields, never `if family == ...` in model code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from fastlora_jax.errors import ConfigError


class RopeKind(enum.Enum):
    """How rotary frequencies are derived (transformers' `rope_type`)."""

    DEFAULT = "default"
    LINEAR = "linear"
    DYNAMIC = "dynamic"
    LLAMA3 = "llama3"
    LONGROPE = "longrope"


class Activation(enum.Enum):
    """Gate activation of the gated MLP: `down(act(gate(x)) * up(x))`."""

    SILU = "silu"
    GELU_TANH = "gelu_pytorch_tanh"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters.

    theta: base of the inverse frequencies `1 / theta**(2i/d)`.
    kind: scaling kind; `factor` (and the llama3 / longrope fields) parameterise it. For longrope,
      `factor` None means `max_position_embeddings / original_max_position_embeddings` (as HF).
    partial_rotary_factor: fraction of each head's dims that is rotated (Phi-3 / NeoX style).
    mrope_section: multimodal rope (Qwen2-VL / Qwen2.5-VL): the rotary frequencies split into
      consecutive sections of these sizes (summing to rotary_dim / 2), section i turning with
      position axis i % 3 (temporal, height, width) of positions [3, batch, seq]; None = 1D rope.
    """

    theta: float = 10000.0
    kind: RopeKind = RopeKind.DEFAULT
    factor: float | None = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    partial_rotary_factor: float = 1.0
    mrope_section: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every number and quirk of a decoder-only transformer (shapes in elements).

    Attributes:
      model_type: HF `model_type` (the family), e.g. "llama".
      vocab_size: V, rows of the embedding and of lm_head.
      hidden_size: H, the residual width.
      intermediate_size: I, the MLP width.
      num_layers: L, decoder blocks.
      num_heads: query heads; num_kv_heads: key/value heads (GQA when smaller, MQA when 1).
      head_dim: per-head width (need not be H / num_heads).
      rms_norm_eps: epsilon inside RMSNorm.
      max_position_embeddings: the context length the model was trained for.
      rope: rotary embedding parameters (of every layer, or of the full-attention layers when
        `local_rope` is set).
      local_rope: rotary parameters of the sliding-attention layers if they differ (Gemma 3's
        `rope_local_base_freq`, v5 `rope_parameters["sliding_attention"]`), else None.
      tie_embeddings: lm_head reuses the embedding matrix.
      mlp_activation: gate activation of the MLP.
      norm_offset: RMSNorm multiplies by `norm_offset + w` (Gemma stores w as an offset from 1).
      embed_scale: embeddings are multiplied by this (cast to the compute dtype) if not None.
      qkv_bias / o_bias / mlp_bias: biases on q,k,v / o / the MLP projections.
      fused_qkv: one `qkv_proj` [q_size + 2 kv_size, H] (rows q, then k, then v) instead of
        q/k/v_proj (Phi-3); kept fused so LoRA targets carry PEFT's names.
      fused_gate_up: one `gate_up_proj` [2 I, H] (gate rows first, then up) instead of
        gate_proj / up_proj (Phi-3).
      attn_logit_softcap / final_logit_softcap: `c * tanh(x / c)` on scores / logits if not None.
      sliding_window: window of the sliding-attention layers (a key is visible iff
        `q - window < k <= q`); `layer_types[i]` ("sliding_attention" / "full_attention") says
        which layers slide; None = every layer slides (Mistral, Phi-3).
      query_pre_attn_scalar: attention scale is `query_pre_attn_scalar ** -0.5` if not None, else
        `head_dim ** -0.5`.
      post_norms: Gemma 2 style extra norms after attention and after the MLP.
      qk_norm: RMSNorm over head_dim on q and k before rope (Qwen3).
      extras: harmless HF keys kept verbatim (JSON-encoded values) for `config_to_hf`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None
    tie_embeddings: bool = False
    mlp_activation: Activation = Activation.SILU
    norm_offset: float = 0.0
    embed_scale: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    post_norms: bool = False
    qk_norm: bool = False
    extras: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, found {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}: grouped-query attention needs it to be")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected "
                              f"num_hidden_layers={self.num_layers}")
        bad = sorted(set(self.layer_types or ()) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"layer_types holds {bad}; supported layer types: {list(LAYER_TYPES)}")

    # ----------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        """Output width of q_proj: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Output width of k_proj and v_proj: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """The factor on q·k before softmax."""
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.head_dim ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def layer_rope(self, layer: int) -> RopeConfig:
        """The rotary parameters of layer `layer` (`local_rope` on sliding-attention layers)."""
        if self.local_rope is not None and self.layer_types is not None and (
                self.layer_types[layer] == "sliding_attention"):
            return self.local_rope
        return self.rope


LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_LAYERS = 4096  # far beyond any released decoder; bounds what a config can make us build

# --------------------------------------------------------------------------------------------
# Keys that do not change the forward math. Their values are kept verbatim (round trip) and never
# read by the model. Anything not here and not parsed by the family is an error.
HARMLESS_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "_name_or_path", "name_or_path",
    "_model_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
    "use_cache", "initializer_range", "pretraining_tp", "is_llama_config", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "use_return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "problem_type", "finetuning_task", "id2label", "label2id", "task_specific_params",
    "tokenizer_class", "prefix", "decoder_start_token_id", "cache_implementation",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size",
    "quantization_config",  # handled by the loader (bitsandbytes checkpoints), not by the math
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "bad_words_ids", "begin_suppress_tokens",
    "suppress_tokens", "diversity_penalty", "num_beam_groups", "typical_p",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "sep_token_id",
})


class _Reader:
    """Pops keys from a HF config dict, with messages that name the file and the key."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self._hf = hf
        self._source = source
        self._extras: dict[str, Any] = {}
        self._hf.pop("model_type", None)
        self._hf.pop("architectures", None)  # derived from the family; written by config_to_hf

    @property
    def source(self) -> str:
        return self._source

    def has(self, key: str) -> bool:
        return key in self._hf and self._hf[key] is not None

    def take(self, key: str, kind: type, default: Any = ...) -> Any:
        """Pop `key`, check it is a `kind` (int accepted for float), or return `default`."""
        if key not in self._hf or self._hf[key] is None:
            self._hf.pop(key, None)
            if default is ...:
                raise ConfigError(f"{self._source}: required key {key!r} is missing; add it "
                                  f"(expected a {kind.__name__})")
            return default
        value = self._hf.pop(key)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{self._source}: key {key!r} must be a {kind.__name__}, "
                              f"found {value!r}")
        return value

    def peek(self, key: str, kind: type) -> Any:
        """The checked value of a required `key`, left in place for a later `take`."""
        value = self.take(key, kind)
        self._hf[key] = value
        return value

    def take_or_null(self, key: str, kind: type, absent: Any) -> Any:
        """Pop `key`: `absent` when the key is missing, None when it is null, else a `kind`
        (HF dataclass defaults that a stored null overrides, e.g. Mistral's sliding_window)."""
        if key not in self._hf:
            return absent
        return self.take(key, kind, None)

    def expect(self, key: str, allowed: tuple[Any, ...], why: str) -> Any:
        """Pop `key` (absent = allowed[0]) and fail unless its value is one of `allowed`."""
        value = self._hf.pop(key, allowed[0])
        if value is None and None not in allowed:
            value = allowed[0]
        if value not in allowed:
            raise ConfigError(f"{self._source}: key {key!r} = {value!r} is not supported "
                              f"(expected one of {list(allowed)}): {why}")
        return value

    def rope(self, head_dim: int, *, default_theta: float = 10000.0,
             original_max_position_embeddings: int | None = None) -> RopeConfig:
        """Read rope_theta/rope_scaling (v4) or rope_parameters (v5) into a RopeConfig.

        `original_max_position_embeddings`, when given (Phi-3 keeps it at the top level), wins
        over the value inside the rope parameters, as in transformers.
        """
        params = self._hf.pop("rope_parameters", None)
        scaling = self._hf.pop("rope_scaling", None)
        theta = self._hf.pop("rope_theta", None)
        partial = self._hf.pop("partial_rotary_factor", None)
        if params is not None and scaling is not None:
            raise ConfigError(f"{self._source}: both 'rope_parameters' and 'rope_scaling' are set; "
                              f"keep one of the two dialects")
        merged = params or scaling or {}
        if not isinstance(merged, dict):
            raise ConfigError(f"{self._source}: rope parameters must be a JSON object, "
                              f"found {merged!r}")
        merged = dict(merged)
        if theta is not None:
            merged.setdefault("rope_theta", theta)
        if partial is not None:
            merged.setdefault("partial_rotary_factor", partial)
        return self._rope_from_dict(merged, f"{self._source} (rope parameters)", head_dim,
                                    default_theta, original_max_position_embeddings)

    def layer_type_ropes(self, head_dim: int, *, default_theta: float,
                         default_local_theta: float) -> tuple[RopeConfig, RopeConfig]:
        """(full-attention rope, sliding-attention rope) of a Gemma 3 style config.

        v5: `rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`.
        v4: `rope_theta` + `rope_scaling` for full attention, `rope_local_base_freq` (default
        `default_local_theta`) for sliding attention, which is never scaled.
        """
        params = self._hf.get("rope_parameters")
        local_theta = self.take("rope_local_base_freq", float, None)
        if isinstance(params, dict) and set(params) and set(params) <= set(LAYER_TYPES):
            self._hf.pop("rope_parameters")
            if local_theta is not None:
                raise ConfigError(f"{self._source}: 'rope_local_base_freq' and per-layer-type "
                                  f"'rope_parameters' are both set; keep one")
            theta = self.take("rope_theta", float, None)
            partial = self.take("partial_rotary_factor", float, None)
            ropes = []
            for layer_type, default in (("full_attention", default_theta),
                                        ("sliding_attention", default_local_theta)):
                sub = dict(params.get(layer_type) or {})
                if theta is not None:
                    sub.setdefault("rope_theta", theta)
                if partial is not None:
                    sub.setdefault("partial_rotary_factor", partial)
                ropes.append(self._rope_from_dict(
                    sub, f"{self._source} (rope_parameters[{layer_type!r}])", head_dim, default,
                    None))
            return ropes[0], ropes[1]
        full = self.rope(head_dim, default_theta=default_theta)
        local = RopeConfig(theta=default_local_theta if local_theta is None else local_theta,
                           partial_rotary_factor=full.partial_rotary_factor)
        return full, local

    def _rope_from_dict(self, merged: dict[str, Any], source: str, head_dim: int,
                        default_theta: float, original_max: int | None) -> RopeConfig:
        kind_name = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
        merged.pop("type", None)
        if kind_name == "su":
            kind_name = "longrope"
        if kind_name == "mrope":  # Qwen2-VL's spelling of default frequencies + mrope_section
            kind_name = "default"
        try:
            kind = RopeKind(kind_name)
        except ValueError:
            raise ConfigError(
                f"{source}: rope type {kind_name!r} is not supported; supported: "
                f"{[k.value for k in RopeKind]}") from None
        sub = _Reader(merged, source)
        factor = sub.take("factor", float, None)
        cfg = RopeConfig(
            theta=sub.take("rope_theta", float, default_theta),
            kind=kind,
            factor=factor if factor is not None or kind is RopeKind.LONGROPE else 1.0,
            low_freq_factor=sub.take("low_freq_factor", float, None),
            high_freq_factor=sub.take("high_freq_factor", float, None),
            original_max_position_embeddings=sub.take("original_max_position_embeddings", int,
                                                      None),
            short_factor=_float_tuple(sub.take("short_factor", list, None), source, "short_factor"),
            long_factor=_float_tuple(sub.take("long_factor", list, None), source, "long_factor"),
            attention_factor=sub.take("attention_factor", float, None),
            partial_rotary_factor=sub.take("partial_rotary_factor", float, 1.0),
            mrope_section=_int_tuple(sub.take("mrope_section", list, None), source,
                                     "mrope_section"),
        )
        sub.finish("rope")
        if original_max is not None:
            cfg = dataclasses.replace(cfg, original_max_position_embeddings=original_max)
        if kind is RopeKind.LLAMA3 and None in (cfg.low_freq_factor, cfg.high_freq_factor,
                                                 cfg.original_max_position_embeddings):
            raise ConfigError(f"{source}: llama3 rope scaling needs factor, low_freq_factor, "
                              f"high_freq_factor and original_max_position_embeddings")
        rotary = int(head_dim * cfg.partial_rotary_factor)
        if kind is RopeKind.LONGROPE:
            for name in ("short_factor", "long_factor"):
                factors = getattr(cfg, name)
                if factors is None or len(factors) != rotary // 2:
                    raise ConfigError(f"{source}: longrope {name} must have rotary_dim/2 = "
                                      f"{rotary // 2} entries, found "
                                      f"{None if factors is None else len(factors)}")
        if cfg.mrope_section is not None and (kind is not RopeKind.DEFAULT
                                              or sum(cfg.mrope_section) != rotary // 2):
            raise ConfigError(f"{source}: mrope_section {list(cfg.mrope_section)} must sum to "
                              f"rotary_dim/2 = {rotary // 2} and go with default frequencies "
                              f"(found rope type {kind.value!r})")
        return cfg

    def finish(self, what: str, harmless: frozenset[str] = frozenset()) -> None:
        """Move harmless keys (global, plus the family's `harmless`) to extras; fail on anything
        left that nobody understood."""
        for key in list(self._hf):
            if key in HARMLESS_KEYS or key in harmless:
                self._extras[key] = self._hf.pop(key)
        if self._hf:
            key = sorted(self._hf)[0]
            raise ConfigError(
                f"{self._source}: key {key!r} (= {self._hf[key]!r}) is not understood for "
                f"{what!r} models; fastlora_jax refuses configs it cannot reproduce exactly. "
                f"Remove the key if it is harmless, or open an issue to support it. "
                f"Unrecognised keys: {sorted(self._hf)}")

    def extras(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in self._extras.items()))


def _float_tuple(values: list | None, source: str, key: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{source}: {key} must be a list of numbers, found {values!r}")
    return tuple(float(v) for v in values)


def _int_tuple(values: list | None, source: str, key: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                             for v in values):
        raise ConfigError(f"{source}: {key} must be a list of positive integers, found {values!r}")
    return tuple(values)


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """`rope_theta` + `rope_scaling` (v4 dialect) for `config_to_hf`."""
    out: dict[str, Any] = {"rope_theta": rope.theta}
    if rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    if rope.mrope_section is not None:  # the spelling of Qwen2.5-VL's own configs
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope.mrope_section)}
        return out
    if rope.kind is RopeKind.DEFAULT:
        out["rope_scaling"] = None
        return out
    scaling: dict[str, Any] = {"rope_type": rope.kind.value}
    if rope.factor is not None:
        scaling["factor"] = rope.factor
    for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                 "attention_factor"):
        value = getattr(rope, name)
        if value is not None:
            scaling[name] = value
    for name in ("short_factor", "long_factor"):
        value = getattr(rope, name)
        if value is not None:
            scaling[name] = list(value)
    out["rope_scaling"] = scaling
    return out


def rotary_dim(config: ModelConfig, rope: RopeConfig | None = None) -> int:
    """Rotary dims of each head under `rope` (default config.rope); partial rotary rounds down
    to an even number."""
    rotary = int(config.head_dim * (rope or config.rope).partial_rotary_factor)
    return rotary - rotary % 2
