"""Training checkpoints with orbax: LoRA params, optimizer state, step (= data position, since a
step's batch depends only on its index), and the run's seed. orbax writes each checkpoint under
a temporary name and finalises it atomically, so a run killed mid-save leaves the last complete
checkpoint intact."""

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
                                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, lora: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(dict(meta, step=step))))
        self.manager.wait_until_finished()

    def restore(self, step: int, lora: Any, opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore into the structure (and shardings) of the given templates."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora,
                                                                  "opt_state": opt_state})
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises several types for mismatched or broken trees
            raise CheckpointError(f"checkpoint {str(self.directory / str(step))!r} could not be "
                                  f"restored into this run ({type(err).__name__}: {err}); was it "
                                  f"written with other LoRA settings?") from None
        return out["state"]["lora"], out["state"]["opt_state"], out["meta"]

    def close(self) -> None:
        self.manager.close()
