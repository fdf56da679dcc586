"""Training checkpoints with orbax: a state tree (LoRA params, optimizer state, and the best
adapter when the run keeps one) and JSON metadata (step = data position, since a step's batch
depends only on its index; the seed; evaluation bookkeeping). orbax writes each checkpoint under
a temporary name and renames it into place once complete, so a run killed mid-save leaves the
last complete checkpoint as the latest; the next run's manager deletes the unfinished one."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from fastlora_jax.errors import CheckpointError


class TrainCheckpoints:
    """`output_dir/checkpoints/<step>/` managed by an orbax CheckpointManager."""

    def __init__(self, output_dir: str | pathlib.Path, *, max_to_keep: int | None) -> None:
        self.directory = pathlib.Path(output_dir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True,
                                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=step))))
        self.manager.wait_until_finished()

    def restore(self, step: int, template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of checkpoint `step`, restored into the structure (and shardings) of
        the `template` state tree."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises several types for mismatched or broken trees
            raise CheckpointError(f"checkpoint {str(self.directory / str(step))!r} could not be "
                                  f"restored into this run ({type(err).__name__}: {err}); was it "
                                  f"written with other LoRA or evaluation settings?") from None
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()
