"""What a user watches: a progress bar, TensorBoard events, a JSONL log and a loss-curve PNG."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any


class RunLogger:
    """Writes every logged step to `log.jsonl` (and TensorBoard), drives the progress bar."""

    def __init__(self, output_dir: pathlib.Path, *, total_steps: int, start_step: int,
                 tensorboard: bool, show_progress: bool,
                 curves: tuple[str, ...] = ("loss",)) -> None:
        self.output_dir = output_dir
        self.curves = curves
        path = output_dir / "log.jsonl"
        kept = []  # a resumed run keeps the records up to its checkpoint, drops the rest
        if start_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.jsonl = open(path, "w")
        self.jsonl.write("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "runs"))
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 disable=not show_progress)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           info="")
        self.progress.start()
        self.history: list[dict[str, Any]] = []
        self._last = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float], tokens: float) -> dict[str, Any]:
        now = time.perf_counter()
        record = dict(step=step, **metrics, tokens_per_second=tokens / max(now - self._last, 1e-9),
                      time=time.time())
        self._last = now
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time"):
                    self.writer.add_scalar(f"train/{key}", value, step)
        self.progress.update(self.task, completed=step, info=(
            f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
            f"{record['tokens_per_second']:.0f} tok/s"))
        return record

    def close(self) -> None:
        self.progress.stop()
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        self.plot()

    def plot(self) -> pathlib.Path | None:
        """loss.png: the training loss (and any other `curves`) over steps, from log.jsonl."""
        path = self.output_dir / "log.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        curves = [c for c in self.curves if any(c in r for r in records)]
        fig, axes = plt.subplots(len(curves), 1, figsize=(6, 3.5 * len(curves)), squeeze=False)
        for ax, key in zip(axes[:, 0], curves):
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss" if key == "loss" else key)
            ax.grid(alpha=0.3)
        axes[0, 0].set_title("fastlora_jax training")
        fig.tight_layout()
        out = self.output_dir / "loss.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
