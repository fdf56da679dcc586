"""Qwen2 and Qwen2.5 (`model_type: qwen2`).

Llama's block with a bias on q_proj, k_proj and v_proj (not o_proj, not the MLP). Sliding-window
attention only when `use_sliding_window`: then layers from `max_window_layers` on slide (or as an
explicit `layer_types` says).
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.config import ModelConfig, _Reader
from fastlora_jax.models.family import Family
from fastlora_jax.models.llama import ALL_PROJECTIONS, parse_llama_like, silu_act, unparse_llama_like


def parse_qwen_windows(r: _Reader, num_layers: int) -> dict[str, Any]:
    """sliding_window (None unless use_sliding_window) and layer_types, as Qwen2/3 configs do."""
    use = r.take("use_sliding_window", bool, False)
    window = r.take_or_null("sliding_window", int, 4096)
    window = window if use else None
    first = r.take("max_window_layers", int, 28)
    layer_types = r.take("layer_types", list, None)
    if layer_types is None:
        layer_types = ["sliding_attention" if window is not None and i >= first else
                       "full_attention" for i in range(num_layers)]
    return dict(sliding_window=window, layer_types=tuple(layer_types))


def unparse_qwen_windows(c: ModelConfig) -> dict[str, Any]:
    sliding = [i for i, t in enumerate(c.layer_types or ()) if t == "sliding_attention"]
    return dict(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                max_window_layers=sliding[0] if sliding else c.num_layers,
                layer_types=list(c.layer_types) if c.layer_types else None)


def _parse(r: _Reader) -> dict[str, Any]:
    fields = parse_llama_like(r, "qwen2", max_pos=32768)
    fields.update(mlp_activation=silu_act(r), qkv_bias=True,
                  **parse_qwen_windows(r, fields["num_layers"]))
    return fields


def _unparse(c: ModelConfig) -> dict[str, Any]:
    out = unparse_llama_like(c)
    if c.head_dim == c.hidden_size // c.num_heads:
        del out["head_dim"]  # Qwen2Config has no head_dim field
    return dict(out, **unparse_qwen_windows(c))


QWEN2 = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    parse_config=_parse,
    unparse_config=_unparse,
    default_target_modules=ALL_PROJECTIONS,
    peft_default_target_modules=("q_proj", "v_proj"),
)
