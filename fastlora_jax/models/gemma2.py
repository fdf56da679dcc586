"""Gemma 2 (2B, 9B, 27B; `model_type: gemma2`).

Gemma's quirks plus: four (1 + w) norms per block (`post_norms`: the attention and MLP outputs are
normed before the residual add, `pre_feedforward_layernorm` feeds the MLP); attention scores
soft-capped at 50 and final logits at 30 (`c * tanh(x / c)`); alternating sliding-window (even
layers) and global (odd layers) attention via `layer_types`; attention scale
`query_pre_attn_scalar ** -0.5`.
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.models.family import Family
from fastlora_jax.models.gemma import parse_gemma_like, unparse_gemma_like
from fastlora_jax.models.llama import ALL_PROJECTIONS


def parse_gemma2_like(r: _Reader, model_type: str, *, max_pos: int, softcaps: tuple[float | None,
                      float | None], default_layer_types: list[str],
                      rope: bool = True) -> dict[str, Any]:
    """Gemma 2 / 3 keys. softcaps = (attention, final) HF defaults; an attention default of
    None leaves `attn_logit_softcapping` unread (Gemma 3 does not apply it)."""
    fields = parse_gemma_like(r, model_type, max_pos=max_pos, rope=rope)
    r.expect("hidden_activation", ("gelu_pytorch_tanh",),
             "Gemma 2/3's MLP is GeGLU with tanh-approximate GELU")
    layer_types = r.take("layer_types", list, None)
    fields.update(
        post_norms=True,
        query_pre_attn_scalar=r.take("query_pre_attn_scalar", int, 256),
        sliding_window=r.take_or_null("sliding_window", int, 4096),
        attn_logit_softcap=(r.take_or_null("attn_logit_softcapping", float, softcaps[0])
                            if softcaps[0] is not None else None),
        final_logit_softcap=r.take_or_null("final_logit_softcapping", float, softcaps[1]),
        layer_types=tuple(layer_types if layer_types is not None else default_layer_types),
    )
    return fields


def unparse_gemma2_like(c: ModelConfig) -> dict[str, Any]:
    out = unparse_gemma_like(c)
    out["hidden_activation"] = out.pop("hidden_act")
    out.update(query_pre_attn_scalar=c.query_pre_attn_scalar, sliding_window=c.sliding_window,
               attn_logit_softcapping=c.attn_logit_softcap,
               final_logit_softcapping=c.final_logit_softcap, layer_types=list(c.layer_types))
    return out


def _parse(r: _Reader) -> dict[str, Any]:
    num_layers = r.peek("num_hidden_layers", int)
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    return parse_gemma2_like(r, "gemma2", max_pos=8192, softcaps=(50.0, 30.0),
                             default_layer_types=default)


GEMMA2 = Family(
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    parse_config=_parse,
    unparse_config=unparse_gemma2_like,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
    harmless_keys=frozenset({"hidden_act"}),  # Gemma 2 reads hidden_activation only
)
