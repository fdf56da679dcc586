"""Evaluation during training: the held-out rows in fixed-shape batches, their loss, and the
bookkeeping of the best evaluation (load_best_model_at_end) and of early stopping.

The evaluation loss is the token-weighted mean over the whole set (the sum of token losses over
all batches divided by all counted tokens, the training step's normalisation), so it does not
depend on the batch size; perplexity is exp(eval_loss). Every batch has the same shape (the last
one is padded with rows that carry no labels), so evaluation compiles once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, eval_sums


class EvalSet:
    """Rows [N, T] (from `build_rows`, or `build_vision_rows` with the image arrays [N, ...]
    beside them) served as batches [1, batch_rows, ...]."""

    def __init__(self, rows: dict[str, np.ndarray], *, batch_rows: int, packing: bool,
                 pad_token_id: int) -> None:
        self.rows = rows
        self.batch_rows = batch_rows
        self.packing = packing
        self.pad_token_id = pad_token_id

    @property
    def num_rows(self) -> int:
        return len(self.rows["input_ids"])

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        n, b = self.num_rows, self.batch_rows
        for start in range(0, n, b):
            batch = {k: v[start:start + b] for k, v in self.rows.items()}
            short = b - len(batch["input_ids"])
            if short:
                # a filler row's image arrays (and what the record derived from them) are
                # zeros: it holds no image token, so no feature of them reaches the loss
                fill = {"input_ids": self.pad_token_id, "targets": IGNORE}
                batch = {k: np.concatenate([v, np.full((short,) + v.shape[1:], fill.get(k, 0),
                                                       v.dtype)])
                         for k, v in batch.items()}
            if not self.packing:  # right padding needs no segment ids (see train/step.py)
                batch.pop("segment_ids")
            yield {k: v[None] for k, v in batch.items()}


def evaluate(eval_set: EvalSet, lora: Any, frozen: Any, cfg: StepConfig,
             place: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]) -> dict[str, float]:
    """eval_loss, eval_perplexity, eval_tokens, eval_runtime of `lora` on the whole set."""
    start = time.perf_counter()
    total, tokens = 0.0, 0.0
    for batch in eval_set.batches():
        loss_sum, count = jax.device_get(eval_sums(lora, frozen, place(batch), cfg=cfg))
        total += float(loss_sum)
        tokens += float(count)
    loss = total / max(tokens, 1.0)
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return {"eval_loss": loss, "eval_perplexity": perplexity, "eval_tokens": tokens,
            "eval_runtime": time.perf_counter() - start}


@dataclasses.dataclass
class BestTracker:
    """The best value of `metric` so far (lower is better) and its step, and how many evaluations
    in a row have not improved on the best by more than `threshold` (early stopping's count)."""

    metric: str
    threshold: float = 0.0
    best: float = math.inf
    best_step: int = 0
    bad_evals: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        value = metrics[self.metric]
        finite = math.isfinite(value)
        # patience compares with the best before this evaluation, as HF's EarlyStoppingCallback
        self.bad_evals = 0 if finite and value < self.best - self.threshold else self.bad_evals + 1
        if finite and value < self.best:
            self.best, self.best_step = value, step
            return True
        return False

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON: the best as a string, since it may be infinite)."""
        return {"best": repr(self.best), "best_step": self.best_step, "bad_evals": self.bad_evals}

    def restore(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_step = int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])
