"""`DPOTrainer`: TRL's shape over preference data, the pure DPO step, checkpoints and logs.

The reference policy is the model's own frozen tree with the adapters off (no second model);
with `precompute_ref_log_probs` its sequence log-probs are computed once before training and
fed to every step. (TRL, handed a model that already carries a trained adapter, uses a frozen
copy of that adapter as the reference instead; for adapters fresh from get_peft_model, whose B
is zero, the two are the same.)
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.converters.atomic import write_text_atomic
from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.train.data import epoch_order, load_dataset_source
from fastlora_jax.train.dpo_data import build_preference_rows
from fastlora_jax.train.dpo_loss import DPOLossConfig, DPOObjective, reference_logprob_sums
from fastlora_jax.train.rl_config import DPOConfig
from fastlora_jax.train.rl_step import TrainRun, optimizer_for, update_step
from fastlora_jax.train.step import StepConfig


class DPOTrainer:
    """DPO on a model returned by `FastLanguageModel.get_peft_model` (TRL's arguments)."""

    def __init__(self, model: CausalLM, args: DPOConfig | None = None, train_dataset: Any = None,
                 processing_class: Any = None) -> None:
        if model.lora is None:
            raise ConfigError("the model has no LoRA adapter; call "
                              "FastLanguageModel.get_peft_model(model, ...) before training")
        if processing_class is None:
            raise ConfigError("DPOTrainer needs processing_class (the tokenizer)")
        self.model, self.tokenizer = model, processing_class
        self.args = a = args or DPOConfig()
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        self.rows = build_preference_rows(load_dataset_source(train_dataset), self.tokenizer,
                                          max_length=a.max_length,
                                          max_prompt_length=a.max_prompt_length,
                                          truncation_mode=a.truncation_mode, pad_token_id=pad)
        self.pairs_per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps
        n = len(self.rows.input_ids)
        if self.pairs_per_step > n:
            raise DataError(f"one optimizer step needs {self.pairs_per_step} pairs "
                            f"(per_device_train_batch_size x gradient_accumulation_steps) but the "
                            f"dataset gives only {n}")
        self.steps_per_epoch = n // self.pairs_per_step
        self.total_steps = a.max_steps if a.max_steps > 0 else max(
            1, int(math.ceil(a.num_train_epochs * self.steps_per_epoch)))
        self.optimizer, self.warmup_steps = optimizer_for(a, self.total_steps)
        self.step_config = StepConfig(model=model.config, lora=model.lora_spec,
                                      remat=a.use_gradient_checkpointing,
                                      loss_chunk=a.loss_chunk_size)
        self.objective = DPOObjective(self.step_config, DPOLossConfig(
            beta=a.beta, loss_type=tuple(a.loss_type),
            loss_weights=tuple(a.loss_weights) if a.loss_weights else None,
            label_smoothing=a.label_smoothing))
        self.ref_logps: np.ndarray | None = None

    def precompute_reference(self, frozen: Any) -> np.ndarray:
        """[N, 2] reference (adapters off) completion log-prob sums of every pair."""
        B = self.args.per_device_train_batch_size
        out = []
        for start in range(0, len(self.rows.input_ids), B):
            sl = slice(start, start + B)
            flat = lambda a: jnp.asarray(a[sl].reshape(-1, a.shape[-1]))  # noqa: E731
            sums = reference_logprob_sums(frozen, flat(self.rows.input_ids),
                                          flat(self.rows.attention_mask),
                                          flat(self.rows.completion_mask), cfg=self.step_config)
            out.append(np.asarray(sums).reshape(-1, 2))
        return np.concatenate(out)

    def batch_at(self, step: int) -> tuple[dict[str, jax.Array], int]:
        """The [A, 2B, S] batch of optimizer step `step` (chosen rows first in each micro-batch)."""
        a = self.args
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.rows.input_ids), epoch, a.seed)
        order = order[within * self.pairs_per_step:(within + 1) * self.pairs_per_step]
        A, B = a.gradient_accumulation_steps, a.per_device_train_batch_size

        def layout(x: np.ndarray) -> np.ndarray:           # [A*B, 2, S] -> [A, 2B, S]
            x = x[order].reshape(A, B, 2, -1)
            return np.concatenate([x[:, :, 0], x[:, :, 1]], axis=1)

        batch = {"input_ids": layout(self.rows.input_ids),
                 "attention_mask": layout(self.rows.attention_mask),
                 "completion_mask": layout(self.rows.completion_mask)}
        if self.ref_logps is not None:
            ref = self.ref_logps[order].reshape(A, B, 2)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[..., 0], ref[..., 1]
        return {k: jnp.asarray(v) for k, v in batch.items()}, epoch

    def train(self, resume_from_checkpoint: bool | str = False) -> dict[str, Any]:
        """Run to total_steps; returns stats and puts the trained adapter back on the model."""
        a = self.args
        run = TrainRun(self.model, a, self.optimizer, self.total_steps, resume_from_checkpoint,
                       curves=("loss", "rewards/margins", "rewards/accuracies"))
        losses, t0 = [], time.perf_counter()
        try:
            if a.precompute_ref_log_probs and self.ref_logps is None:
                self.ref_logps = self.precompute_reference(run.frozen)
            for step in range(run.start, self.total_steps):
                batch, epoch = self.batch_at(step)
                lora, opt_state, metrics = update_step(
                    run.lora, run.opt_state, run.frozen, batch, objective=self.objective,
                    optimizer=self.optimizer, dropout_key=run.dropout_key(step))
                m = run.accept(step, metrics, lora, opt_state)
                losses.append(m["loss"])
                run.after_step(step + 1, dict(m, epoch=epoch),
                               float(batch["attention_mask"].sum()) * a.logging_steps)
        finally:
            run.close()
        stats = {"global_step": self.total_steps, "start_step": run.start,
                 "train_runtime": time.perf_counter() - t0,
                 "train_loss": float(np.mean(losses)) if losses else math.nan,
                 "final_loss": losses[-1] if losses else math.nan,
                 "dropped_examples": self.rows.dropped}
        write_text_atomic(run.out_dir / "train_stats.json", json.dumps(stats, indent=2))
        return stats
