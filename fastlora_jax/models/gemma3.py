"""Gemma 3 text models (270M, 1B, and the text tower of 4B-27B; `model_type: gemma3_text`).

Gemma 2's block without attention soft-capping (transformers' Gemma 3 stores
`attn_logit_softcapping` but never applies it, so neither do we; `final_logit_softcapping` is
applied when set, default null), plus RMSNorm (1 + w) over
head_dim on q and k before rope (`qk_norm`); five sliding-window layers per global one
(`layer_types`, from `sliding_window_pattern` = 6 when absent); and a rope per layer type: global
layers use `rope_theta` (default 1e6) with any `rope_scaling`, sliding layers
`rope_local_base_freq` (default 1e4) unscaled (`local_rope`).
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import ModelConfig, RopeConfig, RopeKind, _Reader, rope_to_hf
from fastlora_jax.models.family import Family
from fastlora_jax.models.gemma2 import parse_gemma2_like, unparse_gemma2_like
from fastlora_jax.models.llama import ALL_PROJECTIONS


def _parse(r: _Reader) -> dict[str, Any]:
    num_layers = r.peek("num_hidden_layers", int)
    pattern = r.take("sliding_window_pattern", int, 6)
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(num_layers)]
    fields = parse_gemma2_like(r, "gemma3_text", max_pos=131072, softcaps=(None, None),
                               default_layer_types=default, rope=False)
    rope, local = r.layer_type_ropes(fields["head_dim"], default_theta=1_000_000.0,
                                     default_local_theta=10_000.0)
    fields.update(qk_norm=True, rope=rope, local_rope=local)
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    out = unparse_gemma2_like(c)
    for key in ("rope_theta", "rope_scaling", "partial_rotary_factor", "attn_logit_softcapping"):
        out.pop(key, None)
    local = c.local_rope or c.rope
    if local == RopeConfig(theta=local.theta, partial_rotary_factor=c.rope.partial_rotary_factor):
        out.update(rope_to_hf(c.rope), rope_local_base_freq=local.theta)  # the v4 dialect
    else:
        out["rope_parameters"] = {"full_attention": _v5(c.rope), "sliding_attention": _v5(local)}
    return out


def _v5(rope: RopeConfig) -> dict[str, Any]:
    """One layer type's v5 rope parameters."""
    v4 = rope_to_hf(rope)
    out = dict(v4.get("rope_scaling") or {"rope_type": RopeKind.DEFAULT.value})
    out["rope_theta"] = v4["rope_theta"]
    if "partial_rotary_factor" in v4:
        out["partial_rotary_factor"] = v4["partial_rotary_factor"]
    return out


GEMMA3 = Family(
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
    # hidden_act: Gemma 3 reads hidden_activation only. _sliding_window_pattern: written by
    # transformers v5 beside an explicit layer_types, and not read back on load.
    # attn_logit_softcapping: kept but never applied by transformers' Gemma 3.
    harmless_keys=frozenset({"hidden_act", "_sliding_window_pattern", "attn_logit_softcapping"}),
)
