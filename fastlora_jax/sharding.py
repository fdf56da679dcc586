"""Logical axis names -> mesh axes, and the mesh itself.

Every parameter carries logical axis names (`ParamSpec.axes`, also the `axes` metadata of each
`nnx.Param`). One rules table maps them to the mesh axes `data`, `fsdp`, `tensor`; a dimension whose
size the mesh axes do not divide is replicated instead (tiny models on big meshes still run).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import ConfigError
from fastlora_jax.models.decoder import Params, param_specs, set_path

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a tuple shards over several mesh axes at once); absent = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; -1 on one axis takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError(f"MeshConfig {self}: at most one axis may be -1")
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            if num_devices % known:
                raise ConfigError(f"MeshConfig {self}: {num_devices} devices are not a multiple "
                                  f"of the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices or min(sizes) < 1:
            raise ConfigError(f"MeshConfig {self}: data*fsdp*tensor = {math.prod(sizes)} must "
                              f"equal the number of devices, {num_devices}")
        return tuple(sizes)  # type: ignore[return-value]

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        shape = self.shape(len(devices))
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` with logical `axes` on `mesh` (see module doc)."""
    used: set[str] = set()
    out: list[Any] = []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and
                          mesh.shape[a] > 1) if name else ()
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """A tree of NamedSharding matching the parameter tree of `config`."""
    tree: Params = {}
    for spec in param_specs(config):
        set_path(tree, spec.path, NamedSharding(mesh, partition_spec(spec.axes, spec.shape, mesh)))
    return tree


def batch_sharding(mesh: Mesh, shape: Sequence[int], *, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an input whose axis `batch_axis` is the batch: the batch over (data, fsdp),
    the axes after it (seq, ...) and before it (e.g. the trainer's accumulation axis of
    [A, B, T]) replicated."""
    axes = (None,) * batch_axis + ("batch",) + ("seq",) * (len(shape) - batch_axis - 1)
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same whole array on every device of `mesh` (adapters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """Place `params` on `mesh` according to the rules.

    A quantized weight (QTensor) is replicated for now: its packed layout has no per-axis split
    that keeps bitsandbytes' blocks whole (see docs/architecture.md).
    """
    shardings = param_shardings(config, mesh)
    whole = replicated(mesh)

    def place(value: Any, sharding: NamedSharding) -> Any:
        if hasattr(value, "codes"):  # QTensor
            return jax.tree.map(lambda a: jax.device_put(a, whole), value)
        return jax.device_put(value, sharding)

    return jax.tree.map(place, params, shardings, is_leaf=lambda v: hasattr(v, "codes"))
