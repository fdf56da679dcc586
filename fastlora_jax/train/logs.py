"""What a user watches: a progress bar, TensorBoard events, a JSONL log and a loss-curve PNG.

`log.jsonl` is append-only: one JSON object per line, never rewritten. A training record holds
`step` and `loss` (plus lr, grad norm, tokens/s, epoch; `skipped` when a non-finite step was
dropped), an evaluation record `step` and `eval_loss` / `eval_perplexity`, and a resumed run
first appends `{"event": "resume", "step": N}` and then continues: records of steps after N
written before an interruption stay in the file, and the later record of a step is the one that
counts (`read_log` applies this). A line cut short by a crash is closed with a newline before
appending, and skipped by readers. `loss.png` is redrawn from the whole log and replaced in one
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
                 tensorboard: bool, show_progress: bool) -> None:
        self.output_dir = output_dir
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
        """loss.png: training loss (and evaluation loss, if any) over steps, from log.jsonl."""
        train, evals = read_log(self.output_dir / LOG_NAME)
        points = sorted((s, r["loss"]) for s, r in train.items()
                        if isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]))
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1.5, label="training loss")
        shown = sorted((s, r["eval_loss"]) for s, r in evals.items()
                       if isinstance(r["eval_loss"], (int, float))
                       and math.isfinite(r["eval_loss"]))
        if shown:
            ax.plot([s for s, _ in shown], [v for _, v in shown], "o-", lw=1.5,
                    label="evaluation loss")
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("fastlora_jax training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.output_dir / PLOT_NAME
        with atomic_file(out, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
        plt.close(fig)
        return out
