"""The one shared decoder, as pure functions over a nested dict of parameters.

Parameter tree (names mirror the HF checkpoint, with `model.` dropped and layers stacked on a leading
axis L so that `jax.lax.scan` runs the blocks and compile time does not grow with depth):

  embed_tokens.weight                 [V, H]
  layers.input_layernorm.weight       [L, H]
  layers.self_attn.{q,k,v}_proj.weight [L, out, H]   (+ .bias [L, out] when qkv_bias)
    or layers.self_attn.qkv_proj.weight [L, Hq*D + 2*Hkv*D, H]        (fused_qkv: Phi-3)
  layers.self_attn.{q,k}_norm.weight  [L, D]        (qk_norm: Qwen3, Gemma 3)
  layers.self_attn.o_proj.weight      [L, H, Hq*D]
  layers.post_attention_layernorm.weight [L, H]
  layers.{pre,post}_feedforward_layernorm.weight [L, H]  (post_norms: Gemma 2 / 3)
  layers.mlp.{gate,up}_proj.weight    [L, I, H];  layers.mlp.down_proj.weight [L, H, I]
    or layers.mlp.gate_up_proj.weight [L, 2*I, H]   (fused_gate_up: Phi-3; gate rows first)
  norm.weight                         [H]
  lm_head.weight                      [V, H]        (absent when tie_embeddings)

Linear weights keep HF's [out, in] layout; a frozen weight may be an array or a `QTensor`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax import ops
from fastlora_jax.config import Activation, ModelConfig
from fastlora_jax.ops.partition import constrain
from fastlora_jax.models.rope import apply_rope, cos_sin

Params = dict[str, Any]

# The name of each scanned layer group's input, for remat policies that save or offload it.
LAYER_INPUT = "decoder_layer_input"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one parameter (per layer shape plus a leading L if stacked)."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    stacked: bool

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


def is_projection(spec: ParamSpec) -> bool:
    """A decoder layer's linear weight: what `load_in_4bit` / `load_in_8bit` quantize.

    Embeddings, norms, biases and lm_head are not: they are small next to the projections, and
    the embedding is a gather, lm_head the precision-sensitive last matmul.
    """
    return (spec.stacked and spec.path[-1] == "weight" and spec.path[1] in ("self_attn", "mlp")
            and spec.path[-2].endswith("_proj"))


def param_specs(config: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the model, in a stable order."""
    c = config
    L, H, I, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    specs = [ParamSpec(("embed_tokens", "weight"), (V, H), ("vocab", "embed"), False)]

    def layer(path: tuple[str, ...], shape: tuple[int, ...], axes: tuple[str | None, ...]) -> None:
        specs.append(ParamSpec(("layers",) + path, (L,) + shape, ("layers",) + axes, True))

    layer(("input_layernorm", "weight"), (H,), ("norm",))
    qkv = ((("qkv_proj", c.q_size + 2 * c.kv_size, "heads"),) if c.fused_qkv else
           (("q_proj", c.q_size, "heads"), ("k_proj", c.kv_size, "kv_heads"),
            ("v_proj", c.kv_size, "kv_heads")))
    for name, out, axis in qkv:
        layer(("self_attn", name, "weight"), (out, H), (axis, "embed"))
        if c.qkv_bias:
            layer(("self_attn", name, "bias"), (out,), (axis,))
    if c.qk_norm:
        layer(("self_attn", "q_norm", "weight"), (c.head_dim,), ("head_dim",))
        layer(("self_attn", "k_norm", "weight"), (c.head_dim,), ("head_dim",))
    layer(("self_attn", "o_proj", "weight"), (H, c.q_size), ("embed", "heads"))
    if c.o_bias:
        layer(("self_attn", "o_proj", "bias"), (H,), ("norm",))
    layer(("post_attention_layernorm", "weight"), (H,), ("norm",))
    if c.post_norms:
        layer(("pre_feedforward_layernorm", "weight"), (H,), ("norm",))
        layer(("post_feedforward_layernorm", "weight"), (H,), ("norm",))
    for name, out in ((("gate_up_proj", 2 * I),) if c.fused_gate_up else
                      (("gate_proj", I), ("up_proj", I))):
        layer(("mlp", name, "weight"), (out, H), ("mlp", "embed"))
        if c.mlp_bias:
            layer(("mlp", name, "bias"), (out,), ("mlp",))
    layer(("mlp", "down_proj", "weight"), (H, I), ("embed", "mlp"))
    if c.mlp_bias:
        layer(("mlp", "down_proj", "bias"), (H,), ("norm",))
    specs.append(ParamSpec(("norm", "weight"), (H,), ("norm",), False))
    if not c.tie_embeddings:
        specs.append(ParamSpec(("lm_head", "weight"), (V, H), ("vocab", "embed"), False))
    return specs


# ---------------------------------------------------------------------------------------------
# Building blocks

def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, offset: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32.

    offset == 0 (Llama): normalise, cast to x's dtype, multiply by w.
    offset != 0 (Gemma): multiply by (offset + w) in float32, then cast.
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def _activation(kind: Activation) -> Callable[[jax.Array], jax.Array]:
    if kind is Activation.SILU:
        return jax.nn.silu
    return lambda x: jax.nn.gelu(x, approximate=True)


# Logical (out, in) axes of each projection's weight, as in `param_specs`: under a mesh they tell
# `ops.linear` which side tensor parallelism splits.
LINEAR_AXES: dict[str, tuple[str, str]] = {
    "q_proj": ("heads", "embed"), "k_proj": ("kv_heads", "embed"), "v_proj": ("kv_heads", "embed"),
    "qkv_proj": ("heads", "embed"), "o_proj": ("embed", "heads"), "gate_proj": ("mlp", "embed"),
    "up_proj": ("mlp", "embed"), "gate_up_proj": ("mlp", "embed"), "down_proj": ("embed", "mlp"),
}


# A projection: (x, name, frozen sub-tree, lora sub-tree or None) -> y. The LoRA layer plugs in here.
Project = Callable[[jax.Array, str, Params, Params | None], jax.Array]


def frozen_project(x: jax.Array, name: str, frozen: Params, lora: Params | None) -> jax.Array:
    """y = x @ W.T + b through the ops dispatch (no adapter)."""
    del lora
    return ops.linear(x, frozen["weight"], frozen.get("bias"), axes=LINEAR_AXES.get(name))


# Attention of one layer: (q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D] after rope, the layer's
# sliding window, the state threaded through the layers, the layer's index) -> (out [B,T,Hq,D],
# state). Training attends within the sequence and threads nothing; the KV-cache decoder
# (`kv_cache.py`) writes k / v into the cache it threads and attends over it.
Attend = Callable[[jax.Array, jax.Array, jax.Array, int | None, Any, jax.Array],
                  tuple[jax.Array, Any]]


def self_attention(config: ModelConfig, segment_ids: jax.Array | None,
                   attention_impl: Any, bidirectional_ids: jax.Array | None = None) -> Attend:
    """Causal attention within the given tokens (packed rows: within each segment); tokens
    sharing a nonzero `bidirectional_ids` entry [B, T] also see each other both ways."""

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None, state: Any,
               layer: jax.Array) -> tuple[jax.Array, Any]:
        del layer
        return ops.attention(q, k, v, segment_ids=segment_ids, causal=True,
                             sliding_window=window, softcap=config.attn_logit_softcap,
                             scale=config.attention_scale, impl=attention_impl,
                             bidirectional_ids=bidirectional_ids), state

    return attend


def decoder_layer(config: ModelConfig, p: Params, lp: Params | None, h: jax.Array,
                  cos: jax.Array, sin: jax.Array, window: int | None, project: Project,
                  attend: Attend, state: Any = None,
                  layer: jax.Array | int = 0) -> tuple[jax.Array, Any]:
    """One block. h [B, T, H] -> ([B, T, H], state). `p`/`lp` are this layer's frozen / LoRA
    params; `attend` with `state` and the layer index `layer` does the attention."""
    c = config
    B, T, _ = h.shape

    def sub(tree: Params | None, *path: str) -> Params | None:
        for key in path:
            if tree is None:
                return None
            tree = tree.get(key)
        return tree

    def proj(x: jax.Array, group: str, name: str) -> jax.Array:
        return project(x, name, p[group][name], sub(lp, group, name))

    def norm(x: jax.Array, name: str, tree: Params | None = None) -> jax.Array:
        tree = p if tree is None else tree
        return rms_norm(x, tree[name]["weight"], eps=c.rms_norm_eps, offset=c.norm_offset)

    x = norm(h, "input_layernorm")
    if c.fused_qkv:
        qkv = proj(x, "self_attn", "qkv_proj")                        # [B,T,Hq*D+2*Hkv*D]
        q, k, v = jnp.split(qkv, [c.q_size, c.q_size + c.kv_size], axis=-1)
    else:
        q = proj(x, "self_attn", "q_proj")                            # [B,T,Hq*D]
        k = proj(x, "self_attn", "k_proj")                            # [B,T,Hkv*D]
        v = proj(x, "self_attn", "v_proj")                            # [B,T,Hkv*D]
    q = q.reshape(B, T, c.num_heads, c.head_dim)                      # [B,T,Hq,D]
    k = k.reshape(B, T, c.num_kv_heads, c.head_dim)                   # [B,T,Hkv,D]
    v = v.reshape(B, T, c.num_kv_heads, c.head_dim)                   # [B,T,Hkv,D]
    q, k, v = (constrain(t, heads_axis=2) for t in (q, k, v))
    if c.qk_norm:
        q = norm(q, "q_norm", p["self_attn"])
        k = norm(k, "k_norm", p["self_attn"])
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    a, state = attend(q, k, v, window, state, layer)
    a = proj(a.reshape(B, T, c.q_size), "self_attn", "o_proj")                      # [B,T,H]
    if c.post_norms:
        a = norm(a, "post_attention_layernorm")
        h = h + a
        x = norm(h, "pre_feedforward_layernorm")
    else:
        h = h + a
        x = norm(h, "post_attention_layernorm")
    act = _activation(c.mlp_activation)
    if c.fused_gate_up:
        gate, up = jnp.split(proj(x, "mlp", "gate_up_proj"), 2, axis=-1)           # [B,T,I] x2
    else:
        gate, up = proj(x, "mlp", "gate_proj"), proj(x, "mlp", "up_proj")           # [B,T,I] x2
    m = act(gate) * up                                                              # [B,T,I]
    m = proj(m, "mlp", "down_proj")                                                 # [B,T,H]
    if c.post_norms:
        m = norm(m, "post_feedforward_layernorm")
    return h + m, state


def layer_segments(config: ModelConfig) -> tuple[tuple[int, int, int], ...]:
    """Contiguous runs of layers, each scanned over a repeating group of `period` layers whose
    static attention setup (window, rope) is the same in every group: (start, stop, period).

    Uniform models are one run of period 1; Gemma 2 one of period 2; Gemma 3 with 18 layers one
    of period 6, and with 26 layers (24, period 6) then (2, period 1); Qwen2 with sliding top
    layers (full run, period 1) then (sliding run, period 1). So only `period` layers per run are
    traced, whatever the depth. Greedy: from each start, the period covering the most layers with
    at least two repeats (period 1 always qualifies), the smaller period on ties.
    """
    kinds = [(config.layer_window(i), config.layer_rope(i)) for i in range(config.num_layers)]
    segments, start = [], 0
    while start < len(kinds):
        best_stop, best_period = start + 1, 1
        for period in range(1, (len(kinds) - start) + 1):
            stop = start + period
            while (stop + period <= len(kinds)
                   and kinds[stop:stop + period] == kinds[start:start + period]):
                stop += period
            if (period == 1 or stop - start >= 2 * period) and stop > best_stop:
                best_stop, best_period = stop, period
        segments.append((start, best_stop, best_period))
        start = best_stop
    return tuple(segments)


def embed(config: ModelConfig, params: Params, input_ids: jax.Array, dtype: Any) -> jax.Array:
    """Token embeddings [B, T, H] in `dtype` (scaled by embed_scale, cast to dtype, if set)."""
    h = jnp.take(params["embed_tokens"]["weight"], input_ids, axis=0).astype(dtype)
    if config.embed_scale is not None:
        h = h * jnp.asarray(config.embed_scale, dtype)
    return h


def hidden_states(config: ModelConfig, params: Params, input_ids: jax.Array, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  lora: Params | None = None, project: Project = frozen_project,
                  attention_impl: Any = None, remat: Callable[[Callable], Callable] | None = None,
                  dtype: Any = None, inputs_embeds: jax.Array | None = None,
                  bidirectional_ids: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, H] for int32 input_ids [B, T].

    inputs_embeds [B, T, H]: the first block's input instead of `embed(input_ids)` (a
    vision-language model's token embeddings with image features scattered in; input_ids then
    only gives the shape). bidirectional_ids [B, T] int32: see `self_attention`.
    """
    c = config
    B, T = input_ids.shape
    dtype = dtype or params["embed_tokens"]["weight"].dtype
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if inputs_embeds is None:
        h = constrain(embed(c, params, input_ids, dtype))           # [B,T,H] batch-split on a mesh
    else:
        h = constrain(inputs_embeds.astype(dtype))                  # [B,T,H]
    ropes = [c.layer_rope(i) for i in range(c.num_layers)]
    tables = {rope: cos_sin(c, positions, rope) for rope in set(ropes)}  # [B,T,rot] each
    attend = self_attention(c, segment_ids, attention_impl, bidirectional_ids)
    h, _ = run_layers(c, params, lora, h, tables, project, attend, None, remat)
    return rms_norm(h, params["norm"]["weight"], eps=c.rms_norm_eps, offset=c.norm_offset)


def run_layers(config: ModelConfig, params: Params, lora: Params | None, h: jax.Array,
               tables: dict[Any, tuple[jax.Array, jax.Array]], project: Project, attend: Attend,
               state: Any, remat: Callable[[Callable], Callable] | None = None
               ) -> tuple[jax.Array, Any]:
    """Every block: (h [B, T, H], state). Stacked layers are scanned segment by segment
    (`layer_segments`); layers given one tree per layer (`unstack_layers`) run one after the
    other, each reading its own weight buffers."""
    lora_layers = None if lora is None else lora.get("layers")
    if isinstance(params["layers"], tuple):
        for i, p_i in enumerate(params["layers"]):
            cos, sin = tables[config.layer_rope(i)]
            h, state = decoder_layer(config, p_i, None if lora_layers is None else lora_layers[i],
                                     h, cos, sin, config.layer_window(i), project, attend, state,
                                     i)
        return h, state
    for start, stop, period in layer_segments(config):
        h, state = _scan_layers(config, params["layers"],
                                None if lora is None else lora.get("layers"), h, tables, start,
                                stop, period, project, attend, state, remat)
    return h, state


def _scan_layers(c: ModelConfig, layers: Params, lora_layers: Params | None, h: jax.Array,
                 tables: dict[Any, tuple[jax.Array, jax.Array]], start: int, stop: int,
                 period: int, project: Project, attend: Attend, state: Any,
                 remat: Callable[[Callable], Callable] | None) -> tuple[jax.Array, Any]:
    """Layers [start, stop) as a scan over (stop - start) / period groups of `period` layers;
    `state` rides in the carry (so a cache in it is updated in place)."""
    windows = [c.layer_window(start + j) for j in range(period)]
    ropes = [c.layer_rope(start + j) for j in range(period)]

    def body(carry: tuple[jax.Array, Any],
             xs: tuple[Params, Params | None, jax.Array]) -> tuple[tuple[jax.Array, Any], None]:
        h, state = carry
        group, lora_group, first = xs
        h = checkpoint_name(constrain(h), LAYER_INPUT)
        for j in range(period):
            p_j, l_j = group, lora_group
            if period > 1:
                p_j = jax.tree.map(lambda a: a[j], group)
                l_j = None if lora_group is None else jax.tree.map(lambda a: a[j], lora_group)
            cos, sin = tables[ropes[j]]
            h, state = decoder_layer(c, p_j, l_j, h, cos, sin, windows[j], project, attend,
                                     state, first + j)
        return (h, state), None

    if remat is not None:
        body = remat(body)
    n = (stop - start) // period
    whole = start == 0 and stop == c.num_layers

    def regroup(a: jax.Array) -> jax.Array:
        # Period 1 scans the stacked arrays as they are: a [n, 1, ...] view of them is laid out
        # differently by XLA, which then copies every weight on every call (each decoded token).
        a = a if whole else a[start:stop]
        return a if period == 1 else a.reshape((n, period) + a.shape[1:])

    group_lora = None if lora_layers is None else jax.tree.map(regroup, lora_layers)
    firsts = jnp.arange(start, stop, period, dtype=jnp.int32)  # index of each group's layer 0
    (h, state), _ = jax.lax.scan(body, (h, state),
                                 (jax.tree.map(regroup, layers), group_lora, firsts))
    return h, state


def unstack_layers(tree: Params, num_layers: int) -> Params:
    """`tree` (frozen or LoRA) with `layers` as a tuple of per-layer trees: a copy of each
    layer's arrays in its own buffer. XLA's CPU dot cannot read a layer out of the stacked array
    in place (scanning copies each layer's weights on every call), so the CPU decode loop runs
    on this layout; `run_layers` takes either."""
    layers = tree["layers"]
    return dict(tree, layers=tuple(
        jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers)))


def lm_head_weight(config: ModelConfig, params: Params) -> jax.Array:
    """[V, H]: the output projection (the embedding when tied)."""
    return params["embed_tokens" if config.tie_embeddings else "lm_head"]["weight"]


def logits_from_hidden(config: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Logits [..., V] in h's dtype (softcapped in float32 when final_logit_softcap is set)."""
    w = lm_head_weight(config, params)
    logits = ops.linear(h, w)
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits = (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)
    return logits


def forward(config: ModelConfig, params: Params, input_ids: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            lora: Params | None = None, project: Project = frozen_project,
            attention_impl: Any = None) -> jax.Array:
    """Logits [B, T, V] for input_ids [B, T] (int32)."""
    h = hidden_states(config, params, input_ids, positions=positions, segment_ids=segment_ids,
                      lora=lora, project=project, attention_impl=attention_impl)
    return logits_from_hidden(config, params, h)


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, 0.02) matrices, unit norms) — for tests and benchmarks."""
    params: Params = {}
    for i, spec in enumerate(param_specs(config)):
        if spec.path[-1] == "bias":
            value = jnp.zeros(spec.shape, dtype)
        elif "norm" in spec.path[-2]:
            value = jnp.full(spec.shape, 0.0 if config.norm_offset else 1.0, dtype)
        else:
            value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), spec.shape)).astype(dtype)
        set_path(params, spec.path, value)
    return params


def set_path(tree: Params, path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def num_params(config: ModelConfig) -> int:
    return sum(math.prod(s.shape) for s in param_specs(config))
