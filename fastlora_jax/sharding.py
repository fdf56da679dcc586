"""Logical axis names -> mesh axes, the mesh itself, and where every parameter lives on it.

Every parameter carries logical axis names (`ParamSpec.axes`, also the `axes` metadata of each
`nnx.Param`). One rules table (`LOGICAL_RULES`, kept in `ops/partition.py`, the lowest layer that
reads it) maps them to the mesh axes `data`, `fsdp`, `tensor`. A mesh axis
that does not divide its dimension moves to the weight's other dimension when that one divides
(storage only: FSDP gathers the whole layer anyway, so it does not matter which dimension holds
it); a weight that no dimension takes is replicated along that mesh axis and `shard_params` says
so in one warning that lists every such weight.

Quantized weights (`QTensor`) shard like the dense ones. NF4 is held in its row view (`tile`):
codes [*lead, N, K/2] and absmax [*lead, N, K/64] split along the same (out, in) mesh axes as a
dense [N, K] weight, with the `in` split a multiple of the 64-element block, so every shard holds
whole blocks and dequantizes alone; the nested (double-quant) absmax, 1/2048 of the codes' bytes,
and the per-matrix offset stay whole on every device, since a nested block can span rows (down_proj
of Llama-3-8B: 224 blocks per row, 256 per nested block). INT8 codes [*lead, N, K] and scales [*lead,
N] shard like a dense weight. So the frozen bytes per device are about total / (fsdp x tensor).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import ConfigError
from fastlora_jax.ops.partition import BATCH_AXES, LOGICAL_RULES, MESH_AXES, spec_entry
from fastlora_jax.quant.qtensor import QTensor, QuantKind, can_tile, tile

class ShardingFallbackWarning(UserWarning):
    """Some weights could not be split along a mesh axis and are replicated along it."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; -1 on one axis takes the remaining devices.

    `shard_adapters`: also split the LoRA params and their optimizer state along fsdp (over their
    `embed`-sized dimension); off by default, as adapters of rank 16 are small next to the
    frozen weights and replicated ones need no gather.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    shard_adapters: bool = False

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError(f"MeshConfig(data={self.data}, fsdp={self.fsdp}, "
                              f"tensor={self.tensor}): at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"MeshConfig(data={self.data}, fsdp={self.fsdp}, "
                              f"tensor={self.tensor}): axis sizes must be >= 1 (or -1 for the rest)")
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            if num_devices % known:
                raise ConfigError(f"MeshConfig(data={self.data}, fsdp={self.fsdp}, "
                                  f"tensor={self.tensor}): {num_devices} devices are not a "
                                  f"multiple of the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"MeshConfig(data={self.data}, fsdp={self.fsdp}, "
                              f"tensor={self.tensor}): data*fsdp*tensor = {math.prod(sizes)} "
                              f"must equal the number of devices, {num_devices}"
                              + _process_note())
        return tuple(sizes)  # type: ignore[return-value]

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The Mesh over `devices` (default: every device of every process), axes in Auto mode."""
        devices = list(jax.devices() if devices is None else devices)
        shape = self.shape(len(devices))
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                    axis_types=(AxisType.Auto,) * len(MESH_AXES))

    def check_model(self, config: ModelConfig, mesh: Mesh) -> None:
        """Errors for a mesh the model cannot use: attention splits heads over `tensor`."""
        t = mesh.shape["tensor"]
        for name, size in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads)):
            if size % t:
                raise ConfigError(f"mesh tensor={t} must divide the model's {name}={size} "
                                  f"(attention runs whole heads per device); choose tensor in "
                                  f"{[d for d in range(1, size + 1) if size % d == 0]}")


def _process_note() -> str:
    if jax.process_count() == 1:
        return ""
    return (f" ({jax.process_count()} processes x {jax.local_device_count()} local devices; "
            f"the mesh spans every process's devices)")


def place_dims(dims: Sequence[tuple[str | None, int, int]], mesh_shape: Mapping[str, int], *,
               move: bool = False) -> tuple[list[tuple[str, ...]], list[str]]:
    """Mesh axes for each dimension of a tensor, and the mesh axes no dimension could take.

    `dims` holds (logical name, size, quantum) per dimension: a split must leave each piece a
    multiple of `quantum` (64 along an NF4 row). With `move`, an axis that its own dimension does
    not divide goes to the first other (non-`layers`) dimension that it divides.
    """
    used: set[str] = set()
    out: list[list[str]] = [[] for _ in dims]
    pending: list[str] = []

    def fits(i: int, ax: str) -> bool:
        _, size, quantum = dims[i]
        pieces = math.prod(mesh_shape[a] for a in out[i]) * mesh_shape[ax]
        return size % (pieces * quantum) == 0

    for i, (name, _, _) in enumerate(dims):
        for ax in LOGICAL_RULES.get(name, ()) if name else ():
            if ax in used or mesh_shape.get(ax, 1) <= 1:
                continue
            if fits(i, ax):
                out[i].append(ax)
                used.add(ax)
            else:
                pending.append(ax)
    unplaced = []
    for ax in pending:
        if ax in used:
            continue
        for i, (name, _, _) in enumerate(dims):
            if move and name not in (None, "layers") and fits(i, ax):
                out[i].append(ax)
                used.add(ax)
                break
        else:
            unplaced.append(ax)
    return [tuple(o) for o in out], unplaced


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` with logical `axes` (a dimension that the mesh axes
    do not divide is replicated)."""
    placed, _ = place_dims([(a, s, 1) for a, s in zip(axes, shape)], mesh.shape)
    return PartitionSpec(*(spec_entry(p) for p in placed))


def quantized_placement(q: QTensor, axes: Sequence[str | None], mesh_shape: Mapping[str, int]
                        ) -> tuple[QTensor, dict[str, PartitionSpec], list[str]]:
    """(q in its sharded layout, a PartitionSpec per array field, mesh axes left unplaced).

    `axes` are the logical names of the stacked weight [*lead, out, in] (as in ParamSpec).
    """
    lead = (None,) * len(q.lead)
    *_, out_name, in_name = axes
    n, k = q.shape
    wanted = [a for name in (out_name, in_name) for a in LOGICAL_RULES.get(name or "", ())
              if mesh_shape.get(a, 1) > 1]
    if q.kind is QuantKind.NF4 and not can_tile(q):
        # Rows of a K % 64 != 0 weight do not hold whole blocks: no split keeps blocks whole.
        return q, {f: PartitionSpec() for f in ("codes", "absmax", "nested_absmax",
                                                "nested_offset")}, sorted(set(wanted))
    quantum = 64 if q.kind is QuantKind.NF4 else 1
    (n_axes, k_axes), unplaced = place_dims([(out_name, n, 1), (in_name, k, quantum)], mesh_shape,
                                            move=True)
    matrix = PartitionSpec(*lead, spec_entry(n_axes), spec_entry(k_axes))
    if q.kind is QuantKind.INT8:
        return q, {"codes": matrix, "scale": PartitionSpec(*lead, spec_entry(n_axes))}, unplaced
    return tile(q), {"codes": matrix, "absmax": matrix, "nested_absmax": PartitionSpec(),
                     "nested_offset": PartitionSpec()}, unplaced


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """A tree of NamedSharding for the dense parameters of `config` (see shard_params for QTensors)."""
    from fastlora_jax.models.decoder import param_specs, set_path

    tree: dict[str, Any] = {}
    for spec in param_specs(config):
        placed, _ = place_dims([(a, s, 1) for a, s in zip(spec.axes, spec.shape)], mesh.shape,
                               move=len(spec.layer_shape) == 2)
        set_path(tree, spec.path, NamedSharding(mesh, PartitionSpec(*map(spec_entry, placed))))
    return tree


def shard_params(params: dict[str, Any], config: ModelConfig, mesh: Mesh, *,
                 warn: bool = True) -> dict[str, Any]:
    """Place `params` on `mesh` by the rules (module docstring); QTensors in their sharded layout.

    One `ShardingFallbackWarning` lists every weight left whole along some mesh axis.
    """
    from fastlora_jax.models.decoder import get_path, param_specs, set_path

    dense = param_shardings(config, mesh)
    out: dict[str, Any] = {}
    fallbacks: list[str] = []
    for spec in param_specs(config):
        value = get_path(params, spec.path)
        if isinstance(value, QTensor):
            view, specs, unplaced = quantized_placement(value, spec.axes, mesh.shape)
            placed = dataclasses.replace(view, **{
                f: _put(getattr(view, f), NamedSharding(mesh, s)) for f, s in specs.items()})
            shape = value.shape
        else:
            sharding = get_path(dense, spec.path)
            placed = _put(value, sharding)
            shape = spec.layer_shape
            unplaced = [] if len(shape) != 2 else _dense_unplaced(spec, mesh)
        if unplaced:
            fallbacks.append(f"{'.'.join(spec.path)} {list(shape)} (whole along "
                             f"{', '.join(unplaced)})")
        set_path(out, spec.path, placed)
    if fallbacks and warn:
        warnings.warn(f"{len(fallbacks)} weight(s) cannot be split on the mesh "
                      f"{dict(mesh.shape)} and are replicated along the named axes (a dimension "
                      f"not divisible by the axis size, or for NF4 a row piece that is not a "
                      f"multiple of 64): " + "; ".join(fallbacks), ShardingFallbackWarning,
                      stacklevel=2)
    return out


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    """device_put; with several processes each builds its own shards from its full host copy."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _dense_unplaced(spec: Any, mesh: Mesh) -> list[str]:
    _, unplaced = place_dims([(a, s, 1) for a, s in zip(spec.axes, spec.shape)], mesh.shape,
                             move=True)
    return unplaced


def batch_sharding(mesh: Mesh, shape: Sequence[int], *, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an input whose axis `batch_axis` is the batch: the batch over (data, fsdp),
    the axes after it (seq, ...) and before it (e.g. the trainer's accumulation axis of
    [A, B, T]) replicated."""
    axes = (None,) * batch_axis + ("batch",) + ("seq",) * (len(shape) - batch_axis - 1)
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same whole array on every device of `mesh` (adapters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def adapter_shardings(tree: Any, mesh: Mesh, *, shard: bool) -> Any:
    """NamedShardings for a LoRA tree (or any tree of its arrays): replicated, or with `shard`
    the largest dimension that fsdp divides split over fsdp (lora_A's `in`, lora_B's `out`)."""
    whole = replicated(mesh)
    f = mesh.shape["fsdp"]

    def one(a: Any) -> NamedSharding:
        shape = getattr(a, "shape", ())
        if not shard or f == 1 or len(shape) < 2:
            return whole
        dim = max(range(1, len(shape)), key=lambda d: (shape[d] % f == 0, shape[d]))
        if shape[dim] % f:
            return whole
        return NamedSharding(mesh, PartitionSpec(*[("fsdp" if d == dim else None)
                                                   for d in range(len(shape))]))

    return jax.tree.map(one, tree)
