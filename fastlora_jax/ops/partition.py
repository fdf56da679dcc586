"""Ops under a mesh: each device runs the op (and its kernel) on its own shard.

When a (data, fsdp, tensor) mesh is the context mesh (`jax.set_mesh(mesh)`, as the trainer does)
`ops.linear` and `ops.attention` wrap their single-device implementation in `jax.shard_map`:

- attention: batch over (data, fsdp), heads over tensor (q and k/v heads both divisible by the
  tensor size, as `MeshConfig.check_model` demands), so the Pallas / cuDNN kernel sees whole heads
  of its own rows and never a gathered operand;
- linear (frozen weight [out, in]): batch over (data, fsdp); with `tensor` on the weight's `out`
  axis (heads / mlp: q, k, v, gate, up) each device computes its slice of the outputs; on its
  `in` axis (o_proj, down_proj) its partial sum over its slice of the inputs, then one psum over
  tensor (Megatron's column / row split). The weight enters the shard_map split only over
  tensor, so its fsdp pieces are all-gathered right there, one layer at a time inside the layer
  scan (and again in the backward): FSDP as it should be, never the whole model at once.
  An NF4 weight arrives in its row view (`quant.tile`); each device rebuilds a flat QTensor of
  its own [out, in] piece with the nested absmax expanded to one value per block (the same
  float32 products, so the same weights bit for bit), which every kernel takes as is.

Without a context mesh (or inside a shard_map already) the ops run as on one device. Activations
get sharding constraints (`constrain`) so XLA does not guess the decoder's layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P

from fastlora_jax.quant import QTensor, QuantKind


MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes (a tuple shards over several mesh axes at once); absent = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "lora_rank": (),
    "layers": (),
    "norm": (),
    "head_dim": (),
    "seq": (),
}


def spec_entry(axes: tuple[str, ...]) -> Any:
    """One PartitionSpec entry: None, a mesh axis name, or a tuple of them."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def active_mesh() -> AbstractMesh | None:
    """The context mesh if it is ours (data, fsdp, tensor) and we are not inside a shard_map."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(MESH_AXES) - set(mesh.axis_names) or mesh.manual_axes:
        return None
    return mesh


def batch_spec(size: int, mesh: AbstractMesh) -> Any:
    """The spec entry for a batch dimension of `size`: (data, fsdp) when they divide it."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    parts = 1
    for a in axes:
        parts *= mesh.shape[a]
    return spec_entry(axes) if axes and size % parts == 0 else None


def _heads_split(mesh: AbstractMesh, *head_counts: int) -> Any:
    t = mesh.shape["tensor"]
    return "tensor" if t > 1 and all(h % t == 0 for h in head_counts) else None


def constrain(x: jax.Array, heads_axis: int | None = None) -> jax.Array:
    """Pin an activation [B, ...] to batch over (data, fsdp) (and dimension `heads_axis` over
    tensor); a no-op without a mesh."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = [batch_spec(x.shape[0], mesh)] + [None] * (x.ndim - 1)
    if heads_axis is not None:
        spec[heads_axis] = _heads_split(mesh, x.shape[heads_axis])
    return jax.lax.with_sharding_constraint(x, P(*spec))


def attention(local: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
              segment_ids: Any) -> jax.Array:
    """`local(q, k, v, segment_ids)` per shard: q [B, T, Hq, D], k/v [B, S, Hkv, D];
    segment_ids: None, a [B, T] array or a tuple of such (each batch-split like q)."""
    mesh = active_mesh()
    if mesh is None:
        return local(q, k, v, segment_ids)
    b = batch_spec(q.shape[0], mesh)
    qkv = P(b, None, _heads_split(mesh, q.shape[2], k.shape[2]), None)
    seg = None if segment_ids is None else P(b, None)
    return jax.shard_map(local, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)


def tensor_mode(axes: Sequence[str | None], n: int, k: int, quantum: int,
                mesh: AbstractMesh) -> str | None:
    """"col" (tensor splits out), "row" (tensor splits in) or None (whole weight per device)."""
    t = mesh.shape["tensor"]
    out_name, in_name = axes
    if t > 1 and "tensor" in LOGICAL_RULES.get(out_name or "", ()) and n % t == 0:
        return "col"
    if t > 1 and "tensor" in LOGICAL_RULES.get(in_name or "", ()) and k % (t * quantum) == 0:
        return "row"
    return None


def _weight_specs(w: Any, mode: str | None) -> Any:
    matrix = P("tensor", None) if mode == "col" else P(None, "tensor") if mode == "row" else P()
    if not isinstance(w, QTensor):
        return matrix
    if w.kind is QuantKind.INT8:
        return dataclasses.replace(w, codes=matrix, scale=P("tensor") if mode == "col" else P())
    return dataclasses.replace(w, codes=matrix, absmax=matrix, nested_absmax=P(),
                               nested_offset=P())


def _local_nf4(w: QTensor, mode: str | None, k: int) -> QTensor:
    """This device's [n_l, k_l] piece of a tiled NF4 weight as a flat QTensor (module doc)."""
    n_l, k_l = w.codes.shape[0], 2 * w.codes.shape[1]
    kb, kb_l = k // w.blocksize, k_l // w.blocksize
    i = jax.lax.axis_index("tensor") if mode is not None else 0
    row0 = i * n_l if mode == "col" else 0
    col0 = i * kb_l if mode == "row" else 0
    blocks = ((row0 + jnp.arange(n_l, dtype=jnp.int32))[:, None] * kb
              + col0 + jnp.arange(kb_l, dtype=jnp.int32)[None, :]).reshape(-1)
    nested = jnp.take(w.nested_absmax, blocks // w.nested_blocksize, mode="clip")
    return dataclasses.replace(w, codes=w.codes.reshape(-1), absmax=w.absmax.reshape(-1),
                               nested_absmax=nested, shape=(n_l, k_l), nested_blocksize=1,
                               tiled=False)


def linear(local: Callable[[jax.Array, Any], jax.Array], x: jax.Array, w: Any,
           axes: Sequence[str | None]) -> jax.Array:
    """`local(x, w)` (x [..., in] @ w[out, in].T) per shard; `axes` = w's logical (out, in)."""
    mesh = active_mesh()
    if mesh is None:
        return local(x, w)
    quantized = isinstance(w, QTensor)
    n, k = w.shape
    nf4 = quantized and w.kind is QuantKind.NF4
    # A flat NF4 weight (K % 64 != 0: sharding left it whole) runs whole on every device.
    mode = None if nf4 and not w.tiled else tensor_mode(axes, n, k, 64 if nf4 else 1, mesh)
    b = batch_spec(x.shape[0], mesh) if x.ndim > 1 else None
    mid = (None,) * max(x.ndim - 2, 0)
    x_spec = P(b, *mid, "tensor" if mode == "row" else None) if x.ndim > 1 else P()
    y_spec = P(b, *mid, "tensor" if mode == "col" else None) if x.ndim > 1 else P()

    def body(xl: jax.Array, wl: Any) -> jax.Array:
        if nf4 and wl.tiled:
            wl = _local_nf4(wl, mode, k)
        elif quantized and wl.kind is QuantKind.INT8:
            wl = dataclasses.replace(wl, shape=tuple(wl.codes.shape))
        y = local(xl, wl)
        return jax.lax.psum(y, "tensor") if mode == "row" else y

    return jax.shard_map(body, in_specs=(x_spec, _weight_specs(w, mode)), out_specs=y_spec,
                         check_vma=False)(x, w)
