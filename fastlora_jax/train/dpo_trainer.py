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
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import ConfigError, DataError, TrainingError
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.train.checkpoint import TrainCheckpoints
from fastlora_jax.train.data import epoch_order, load_dataset_source
from fastlora_jax.train.dpo_data import build_preference_rows
from fastlora_jax.train.dpo_loss import DPOLossConfig, dpo_step, reference_logprob_sums
from fastlora_jax.train.logs import RunLogger
from fastlora_jax.train.rl_config import DPOConfig
from fastlora_jax.train.rl_step import start_run
from fastlora_jax.train.step import StepConfig, make_optimizer
from fastlora_jax.train.trainer import _writable_dir


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
        self.warmup_steps = a.warmup_steps or int(math.ceil(a.warmup_ratio * self.total_steps))
        self.optimizer = make_optimizer(
            learning_rate=a.learning_rate, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps, lr_scheduler_type=a.lr_scheduler_type,
            weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_epsilon=a.adam_epsilon)
        self.step_config = StepConfig(model=model.config, lora=model.lora_spec,
                                      remat=model.use_gradient_checkpointing,
                                      loss_chunk=a.loss_chunk_size)
        self.loss_config = DPOLossConfig(
            beta=a.beta, loss_type=tuple(a.loss_type),
            loss_weights=tuple(a.loss_weights) if a.loss_weights else None,
            label_smoothing=a.label_smoothing)
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
        out_dir = _writable_dir(pathlib.Path(a.output_dir))
        checkpoints = TrainCheckpoints(out_dir, max_to_keep=a.save_total_limit)
        lora = jax.tree.map(jnp.copy, self.model.lora_params())
        opt_state = self.optimizer.init(lora)
        frozen = self.model.params()
        lora, opt_state, start = start_run(checkpoints, lora, opt_state, resume_from_checkpoint)
        if a.precompute_ref_log_probs and self.ref_logps is None:
            self.ref_logps = self.precompute_reference(frozen)
        logger = RunLogger(out_dir, total_steps=self.total_steps, start_step=start,
                           tensorboard=a.report_to == "tensorboard",
                           show_progress=not a.disable_tqdm,
                           curves=("loss", "rewards/margins", "rewards/accuracies"))
        dropout = self.model.lora_spec.config.lora_dropout > 0
        base_key = jax.random.key(a.seed)
        losses, last_saved, t0 = [], start, time.perf_counter()
        try:
            for step in range(start, self.total_steps):
                batch, epoch = self.batch_at(step)
                key = jax.random.fold_in(base_key, step) if dropout else None
                new_lora, new_opt, metrics = dpo_step(lora, opt_state, frozen, batch,
                                                      cfg=self.step_config, lcfg=self.loss_config,
                                                      optimizer=self.optimizer, dropout_key=key)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
                    raise TrainingError(
                        f"non-finite loss/grad norm at step {step + 1} (loss={m['loss']}); "
                        f"training stopped, the last good checkpoint (step {last_saved}) is "
                        f"intact. Lower learning_rate or check the data")
                lora, opt_state = new_lora, new_opt
                losses.append(m["loss"])
                done = step + 1
                if done % a.logging_steps == 0 or done == self.total_steps:
                    logger.log(done, dict(m, epoch=epoch),
                               float(batch["attention_mask"].sum()) * a.logging_steps)
                if (a.save_steps and done % a.save_steps == 0) or done == self.total_steps:
                    checkpoints.save(done, lora, opt_state, {"seed": a.seed,
                                                             "total_steps": self.total_steps})
                    last_saved = done
        finally:
            logger.close()
            checkpoints.close()
            self.model.set_adapter(self.model.lora_spec, jax.device_get(lora))
        stats = {"global_step": self.total_steps, "start_step": start,
                 "train_runtime": time.perf_counter() - t0,
                 "train_loss": float(np.mean(losses)) if losses else math.nan,
                 "final_loss": losses[-1] if losses else math.nan,
                 "dropped_examples": self.rows.dropped}
        (out_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
        return stats
