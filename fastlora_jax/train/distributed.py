"""Multi-process runs: how a launch is found, who writes files, which process reads which data.

Launch: `fastlora-jax train --coordinator_address HOST:PORT --num_processes N --process_id I`,
or the same three values from the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), or a SLURM job step of several tasks (`srun`), where `jax.distributed` reads
the coordinator, task count and rank from SLURM itself. Everything else is JAX's own runtime.

Files: only process 0 writes logs, plots, run info, adapters and exports; orbax checkpoints are
written by every process together, as orbax requires (each saves the shards it holds).

Data: the global batch is split over the mesh's `data` x `fsdp` batch groups. With G groups the
dataset is dealt into G shards (example i to shard i mod G), each tokenized and packed on its
own, and group g's rows of every step come from shard g. A process tokenizes only the shards of
the groups its devices hold, and the batches do not depend on how the devices are spread over
processes: two processes of two devices train exactly like one process of four.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from fastlora_jax.errors import ConfigError
from fastlora_jax.sharding import batch_sharding
from fastlora_jax.train.data import DataStats, batch_at


@dataclasses.dataclass(frozen=True)
class Launch:
    """A multi-process launch: coordinator (None: SLURM tells jax), process count and index."""

    coordinator_address: str | None
    num_processes: int
    process_id: int
    source: str


def find_launch(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None, environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch the flags (first) or the environment describe; None for a single process."""
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        values, source = (coordinator_address, num_processes, process_id), "flags"
    elif "JAX_COORDINATOR_ADDRESS" in environ:
        values = (environ["JAX_COORDINATOR_ADDRESS"], environ.get("JAX_NUM_PROCESSES"),
                  environ.get("JAX_PROCESS_ID"))
        source = "environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
    elif int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1"))) > 1:
        tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
        return _checked(Launch(None, int(tasks), int(environ.get("SLURM_PROCID", "-1")),
                               "SLURM (SLURM_NTASKS, SLURM_PROCID)"))
    else:
        return None
    names = ("coordinator_address", "num_processes", "process_id")
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise ConfigError(f"multi-process launch from {source}: {', '.join(missing)} missing "
                          f"(given {dict(zip(names, values))}); pass all three")
    return _checked(Launch(str(values[0]), int(values[1]), int(values[2]), source))


def _checked(launch: Launch) -> Launch:
    if launch.num_processes < 1 or not 0 <= launch.process_id < launch.num_processes:
        raise ConfigError(f"multi-process launch from {launch.source}: process_id="
                          f"{launch.process_id} must be in [0, num_processes={launch.num_processes})")
    return launch


def initialize(launch: Launch | None) -> None:
    """Start jax.distributed for `launch` (nothing for None or an already started runtime)."""
    if launch is None or jax.distributed.is_initialized():
        return
    if launch.coordinator_address is None:
        jax.distributed.initialize()  # SLURM: jax's cluster detection reads the job's variables
    else:
        jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                                   num_processes=launch.num_processes,
                                   process_id=launch.process_id)
    if jax.process_count() != launch.num_processes:
        raise ConfigError(f"launch from {launch.source} asked for {launch.num_processes} "
                          f"processes, jax.distributed started {jax.process_count()}")


def is_main_process() -> bool:
    """Process 0 writes the run's files (logs, plots, adapters, exports)."""
    return jax.process_index() == 0


class NullLogger:
    """What processes other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict[str, float], tokens: float) -> dict[str, Any]:
        return {}

    def log_eval(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {}

    def event(self, name: str, step: int, **extra: Any) -> None:
        return None

    def close(self) -> None:
        return None


def default_mesh_config() -> Any:
    """A multi-process run without a mesh gets plain FSDP over every device."""
    from fastlora_jax.sharding import MeshConfig

    return MeshConfig() if jax.process_count() > 1 else None


def to_host(tree: Any) -> Any:
    """numpy copies of a tree of (possibly multi-process sharded) arrays, on every process."""
    from jax.experimental import multihost_utils

    def one(a: Any) -> Any:
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(a)
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, tree)


def put_from_host(tree: Any, shardings: Any) -> Any:
    """Place a tree that every process holds in full onto `shardings` (one per leaf)."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(
        np.shape(a), s, lambda index, a=np.asarray(a): a[index]), tree, shardings)


def local_batch_groups(mesh: Mesh, *, first_only: bool = False) -> list[int]:
    """Indices (data-major) of the mesh's data x fsdp batch groups this process holds devices of
    (`first_only`: whose first device it holds)."""
    me = jax.process_index()
    devices = mesh.devices  # [data, fsdp, tensor]
    groups = devices.reshape(devices.shape[0] * devices.shape[1], -1)
    return [g for g in range(groups.shape[0])
            if any(d.process_index == me for d in (groups[g][:1] if first_only else groups[g]))]


def mesh_context(mesh: Mesh | None) -> Any:
    """`jax.set_mesh(mesh)` (ops then run per shard, ops/partition.py), or nothing without one."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


class DataShards:
    """The rows of this process's data shards (module docstring), and each step's batch."""

    def __init__(self, dataset: Any, build: Callable[[Any], tuple[dict[str, np.ndarray], DataStats]],
                 mesh: Mesh | None) -> None:
        self.mesh = mesh
        self.num_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.local = [0] if mesh is None else local_batch_groups(mesh)
        self.owned = self.local if mesh is None else local_batch_groups(mesh, first_only=True)
        self.rows: dict[int, dict[str, np.ndarray]] = {}
        self.stats = DataStats()
        for s in self.local:
            part = dataset if self.num_shards == 1 else dataset.shard(
                num_shards=self.num_shards, index=s, contiguous=False)
            self.rows[s], stats = build(part)
            for field in dataclasses.fields(DataStats):
                setattr(self.stats, field.name,
                        getattr(self.stats, field.name) + getattr(stats, field.name))

    def steps_per_epoch(self, rows_per_group: int) -> int:
        """Whole steps in one epoch of the smallest shard (over every process)."""
        local = min(len(r["input_ids"]) // rows_per_group for r in self.rows.values())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = int(np.min(multihost_utils.process_allgather(np.int32(local))))
        return local

    def batch(self, step: int, *, rows_per_group: int, accumulation: int, seed: int,
              keys: tuple[str, ...]) -> tuple[dict[str, jax.Array], int, float]:
        """(the global [A, groups x rows, T] batch of `step` as arrays, epoch, real tokens)."""
        parts, epoch = [], 0
        for s in self.local:
            part, epoch = batch_at(self.rows[s], step, rows_per_step=rows_per_group,
                                   accumulation=accumulation, seed=seed)
            parts.append(part)
        local = {k: np.concatenate([p[k] for p in parts], axis=1) for k in keys}
        # a group held by several processes (tensor across processes) counts once, at its first
        tokens = float(sum((p["segment_ids"] > 0).sum() for s, p in zip(self.local, parts)
                           if s in self.owned))
        if self.mesh is None:
            return {k: jax.numpy.asarray(v) for k, v in local.items()}, epoch, tokens
        out = {}
        for k, v in local.items():
            shape = (v.shape[0], v.shape[1] * self.num_shards // len(self.local), v.shape[2])
            out[k] = jax.make_array_from_process_local_data(
                batch_sharding(self.mesh, shape, batch_axis=1), v, shape)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            tokens = float(np.sum(multihost_utils.process_allgather(np.float64(tokens))))
        return out, epoch, tokens
