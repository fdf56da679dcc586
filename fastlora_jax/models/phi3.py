"""Phi-3 and Phi-3.5 (mini, medium; `model_type: phi3`).

Quirks, as fields: the attention input projection is one `qkv_proj` (rows q, k, v) and the MLP's
gate and up projections one `gate_up_proj` (gate rows first); both stay fused in our tree
(`fused_qkv`, `fused_gate_up`), so LoRA adapters target and export PEFT's module names.
RoPE may be partial (`partial_rotary_factor`) and LongRoPE-scaled (`rope_scaling.type` "longrope"
or the legacy "su"): per-frequency short / long factors, the long ones once the sequence exceeds
`original_max_position_embeddings` (a top-level key that wins over the rope parameters' copy),
and cos / sin multiplied by the attention factor sqrt(1 + ln(s) / ln(orig)), s = max_pos / orig.
`sliding_window` (e.g. 2047 in Phi-3-mini-4k) applies to every layer.

LoRA targets. PEFT has no default for phi3 (`target_modules=None` is an error there), so ours are
explicit: `get_peft_model` without target_modules adapts every projection, i.e.
("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), as Unsloth does for Phi-3; the same list is
used to read a PEFT adapter whose target_modules is null.
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.models.family import Family
from fastlora_jax.models.llama import parse_llama_like, silu_act, unparse_llama_like

PHI3_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _parse(r: _Reader) -> dict[str, Any]:
    fields = parse_llama_like(r, "phi3", eps=1e-5, max_pos=4096, rope=False)
    original = r.take("original_max_position_embeddings", int, 4096)
    for key in ("resid_pdrop", "embd_pdrop"):
        r.expect(key, (0.0, 0), "dropout is not implemented; set it to 0.0")
    r.expect("attention_bias", (False,), "Phi-3's projections have no bias")
    fields.update(
        mlp_activation=silu_act(r),
        rope=r.rope(fields["head_dim"], original_max_position_embeddings=original),
        sliding_window=r.take("sliding_window", int, None),
        fused_qkv=True, fused_gate_up=True)
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    out = unparse_llama_like(c)
    if c.head_dim == c.hidden_size // c.num_heads:
        del out["head_dim"]  # Phi3Config has no head_dim field
    out.update(original_max_position_embeddings=c.rope.original_max_position_embeddings,
               sliding_window=c.sliding_window, resid_pdrop=0.0, embd_pdrop=0.0)
    return out


PHI3 = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=PHI3_PROJECTIONS,
    peft_default_target_modules=None,
    # auto_map: the remote-code class names of the original upload; transformers' own Phi3 is
    # used and no remote code ever runs.
    harmless_keys=frozenset({"auto_map"}),
)
