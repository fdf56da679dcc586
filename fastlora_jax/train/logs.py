"""What a user watches: a progress bar, TensorBoard events, a JSONL log and a loss-curve PNG.

`log.jsonl` is append-only: one JSON object per line, never rewritten. A training record holds
`step` and `loss` (plus lr, grad norm, tokens/s, epoch; `skipped` when a non-finite step was
dropped), an evaluation record `step` and `eval_loss` / `eval_perplexity`, and a resumed run
first appends `{"event": "resume", "step": N}` and then continues: records of steps after N
written before an interruption stay in the file, and the later record of a step is the one that
counts (`read_log` applies this). A line cut short by a crash is closed with a newline before
appending, and skipped by readers. `loss.png` is redrawn from the whole log (the training loss with
the evaluation loss beside it, then any other `curves`, e.g. GRPO's reward) and replaced in one
rename.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

from fastlora_jax.converters.atomic import atomic_file

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"


def read_log(path: pathlib.Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """({step: training record}, {step: evaluation record}) of a log, the later record of a step
    winning (a resumed run rewrites the steps after its checkpoint); torn lines are skipped."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return train, evals
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if "eval_loss" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    return train, evals


class RunLogger:
    """Appends every logged step to `log.jsonl` (and TensorBoard), drives the progress bar."""

    def __init__(self, output_dir: pathlib.Path, *, total_steps: int, start_step: int,
                 tensorboard: bool, show_progress: bool,
                 curves: tuple[str, ...] = ("loss",)) -> None:
        self.output_dir = output_dir
        self.curves = curves
        path = output_dir / LOG_NAME
        self.jsonl = open(path, "a+b")
        if self.jsonl.tell() > 0:
            self.jsonl.seek(-1, 2)
            if self.jsonl.read(1) != b"\n":  # a record torn by a crash: close its line
                self.jsonl.write(b"\n")
        if start_step > 0:
            self.event("resume", start_step)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the interrupted run's events after the checkpoint
            self.writer = SummaryWriter(str(output_dir / "runs"),
                                        purge_step=start_step if start_step > 0 else None)
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 disable=not show_progress)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           info="")
        self.progress.start()
        self._last = time.perf_counter()
        self._train_info = ""
        self._eval_info = ""

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write((json.dumps(record) + "\n").encode())
        self.jsonl.flush()

    def event(self, name: str, step: int, **extra: Any) -> None:
        """A record of something that happened at `step` (resume, early_stop)."""
        self._write(dict(event=name, step=step, **extra, time=time.time()))

    def log(self, step: int, metrics: dict[str, float], tokens: float) -> dict[str, Any]:
        """A training record (metrics: loss, grad_norm, learning_rate, epoch, ...)."""
        now = time.perf_counter()
        record = dict(step=step, **metrics, tokens_per_second=tokens / max(now - self._last, 1e-9),
                      time=time.time())
        self._last = now
        self._write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        skipped = f"  skipped {int(record['nonfinite_total'])}" if record.get(
            "nonfinite_total") else ""
        self._train_info = (f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                            f"{record['tokens_per_second']:.0f} tok/s{skipped}")
        self._show(step)
        return record

    def log_eval(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """An evaluation record (eval_loss, eval_perplexity, eval_tokens, eval_runtime)."""
        record = dict(step=step, **metrics, time=time.time())
        self._write(record)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key.removeprefix('eval_')}", value, step)
        self._eval_info = (f"  eval {record['eval_loss']:.4f} "
                           f"(ppl {record['eval_perplexity']:.3g})")
        self._show(step)
        return record

    def _show(self, step: int) -> None:
        self.progress.update(self.task, completed=step, info=self._train_info + self._eval_info)

    def close(self) -> None:
        self.progress.stop()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        self.plot()

    def plot(self) -> pathlib.Path | None:
        """loss.png: the training loss (with the evaluation loss, if any) and any other `curves`
        over steps, from log.jsonl."""
        train, evals = read_log(self.output_dir / LOG_NAME)

        def points(records: dict[int, dict[str, Any]], key: str) -> list[tuple[int, float]]:
            return sorted((s, r[key]) for s, r in records.items()
                          if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))

        curves = [c for c in self.curves if points(train, c)]
        if not curves:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(curves), 1, figsize=(6, 3.5 * len(curves)), squeeze=False)
        for ax, key in zip(axes[:, 0], curves):
            shown = points(train, key)
            ax.plot([p[0] for p in shown], [p[1] for p in shown], lw=1.5,
                    label="training loss" if key == "loss" else key)
            held_out = points(evals, "eval_loss") if key == "loss" else []
            if held_out:
                ax.plot([p[0] for p in held_out], [p[1] for p in held_out], "o-", lw=1.5,
                        label="evaluation loss")
                ax.legend()
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss" if key == "loss" else key)
            ax.grid(alpha=0.3)
        axes[0, 0].set_title("fastlora_jax training")
        fig.tight_layout()
        out = self.output_dir / PLOT_NAME
        with atomic_file(out, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
        plt.close(fig)
        return out
