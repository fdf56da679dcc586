"""`GRPOTrainer`: TRL's shape over rollouts, rewards, the pure GRPO step, checkpoints and logs.

One generation round: take generation_batch_size / num_generations prompts, sample
num_generations completions of each from the current policy (adapters unmerged, on the training
arrays), score them, compute group-relative advantages, then — when the round is reused
(num_iterations > 1 or more micro-batches than one optimizer step) — the old policy's log-probs,
and with beta > 0 the reference's (the same frozen tree, adapters off). The round is shuffled,
split into steps_per_generation micro-batches and trained on num_iterations times.
Shapes are fixed (prompts left-padded to the longest dataset prompt, completions right-padded to
max_completion_length), so every jit'd function compiles once.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from fastlora_jax.converters.atomic import write_text_atomic
from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.train.data import epoch_order, load_dataset_source
from fastlora_jax.train.grpo_loss import GRPOLossConfig, GRPOObjective, score_completions
from fastlora_jax.train.rewards import RewardFunc, advantages, load_reward_funcs, nanstd, \
    reward_name, score
from fastlora_jax.train.rl_config import GRPOConfig
from fastlora_jax.train.rl_step import TrainRun, optimizer_for, update_step
from fastlora_jax.train.rollout import SamplingParams, sample_completions
from fastlora_jax.train.step import StepConfig

Rollout = Callable[[StepConfig, Any, Any, list[list[int]], SamplingParams, int], list[list[int]]]


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def tokenize_prompt(tokenizer: Any, prompt: Any, max_prompt_length: int | None) -> list[int]:
    """Chat prompts through the chat template (generation prompt added), text as is; the last
    max_prompt_length tokens are kept."""
    if is_conversational(prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        raise DataError(f"a prompt must be a string or a list of chat messages, found "
                        f"{type(prompt).__name__}: {prompt!r}")
    if not ids:
        raise DataError(f"prompt {prompt!r} tokenizes to no tokens")
    return list(ids[-max_prompt_length:] if max_prompt_length else ids)


def prompt_columns(data: Any) -> dict[str, list[Any]]:
    """The prompt dataset as columns. A list of row dicts (prompts built in memory) is taken as
    is, without `datasets`; a `datasets.Dataset` or a data file goes through
    `load_dataset_source`. Prompt sets are small, so the columns are held in memory."""
    if isinstance(data, list):
        if not data:
            raise DataError("train_dataset is an empty list; it needs one dict per example")
        for i, r in enumerate(data):
            if not isinstance(r, dict):
                raise DataError(f"train_dataset row {i} is a {type(r).__name__}; a list "
                                f"dataset holds one dict per example (with a 'prompt' key)")
        keys = list(data[0])
        for i, r in enumerate(data):
            if sorted(r) != sorted(keys):
                raise DataError(f"train_dataset row {i} has keys {sorted(r)}, row 0 has "
                                f"{sorted(keys)}; every row needs the same keys")
        return {k: [r[k] for r in data] for k in keys}
    return load_dataset_source(data).to_dict()


class GRPOTrainer:
    """GRPO on a model returned by `FastLanguageModel.get_peft_model` (TRL's arguments).

    `rollout` (default: `fastlora_jax.train.rollout.sample_completions`) samples completions;
    `trainer.train()` returns the run's stats and puts the trained adapter back on `model`.
    """

    def __init__(self, model: CausalLM, reward_funcs: RewardFunc | str | Sequence[RewardFunc | str],
                 args: GRPOConfig | None = None, train_dataset: Any = None,
                 processing_class: Any = None, rollout: Rollout | None = None) -> None:
        if model.lora is None:
            raise ConfigError("the model has no LoRA adapter; call "
                              "FastLanguageModel.get_peft_model(model, ...) before training")
        if processing_class is None:
            raise ConfigError("GRPOTrainer needs processing_class (the tokenizer)")
        self.model, self.tokenizer = model, processing_class
        self.args = args or GRPOConfig()
        a = self.args
        if callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        self.reward_funcs = load_reward_funcs(reward_funcs)
        self.reward_weights = np.asarray(a.reward_weights or [1.0] * len(self.reward_funcs))
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries for "
                              f"{len(self.reward_funcs)} reward functions")
        self.columns = prompt_columns(train_dataset)
        if "prompt" not in self.columns:
            raise DataError(f"the GRPO dataset needs a 'prompt' column; found "
                            f"{list(self.columns)}")
        self.num_rows = len(self.columns["prompt"])
        self.prompt_ids = [tokenize_prompt(self.tokenizer, p, a.max_prompt_length)
                           for p in self.columns["prompt"]]
        self.prompt_width = max(len(p) for p in self.prompt_ids)
        if self.num_rows < a.prompts_per_generation:
            raise DataError(f"a generation round needs {a.prompts_per_generation} prompts but the "
                            f"dataset has {self.num_rows}")
        self.rollout = rollout or sample_completions
        eos = self.tokenizer.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.sampling = SamplingParams(max_new_tokens=a.max_completion_length,
                                       eos_token_ids=self.eos_ids, pad_token_id=self.pad_id,
                                       temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                       min_p=a.min_p)
        self.steps_per_round = a.steps_per_generation * a.num_iterations \
            // a.gradient_accumulation_steps
        rounds_per_epoch = self.num_rows // a.prompts_per_generation
        self.total_steps = a.max_steps if a.max_steps > 0 else max(
            1, int(math.ceil(a.num_train_epochs * rounds_per_epoch)) * self.steps_per_round)
        self.optimizer, self.warmup_steps = optimizer_for(a, self.total_steps)
        self.step_config = StepConfig(model=model.config, lora=model.lora_spec,
                                      remat=a.use_gradient_checkpointing,
                                      loss_chunk=a.loss_chunk_size)
        self.objective = GRPOObjective(self.step_config, GRPOLossConfig(
            loss_type=a.loss_type, beta=a.beta, epsilon_low=a.epsilon,
            epsilon_high=a.epsilon_high, delta=a.delta,
            importance_sampling_level=a.importance_sampling_level, temperature=a.temperature,
            max_completion_length=a.max_completion_length,
            use_bias_correction_kl=a.use_bias_correction_kl))
        # Reused rounds need the sampling policy's log-probs (TRL: when generation and the
        # optimizer steps are not aligned); a single on-policy step uses the detached current ones.
        self.needs_old_logps = a.steps_per_generation * a.num_iterations \
            != a.gradient_accumulation_steps

    # -----------------------------------------------------------------------------------------
    def _round_prompts(self, round_index: int) -> list[int]:
        """Dataset indices of a round's prompts (epochs walked in a seeded order)."""
        per_round = self.args.prompts_per_generation
        per_epoch = self.num_rows // per_round
        epoch, within = divmod(round_index, per_epoch)
        order = epoch_order(self.num_rows, epoch, self.args.seed)
        return order[within * per_round:(within + 1) * per_round].tolist()

    def generate_round(self, round_index: int, frozen: Any, lora: Any) -> dict[str, Any]:
        """Sample, score and lay out one round. Returns arrays [N, ...] plus what gets logged."""
        a = self.args
        G = a.num_generations
        indices = [i for i in self._round_prompts(round_index) for _ in range(G)]
        prompts = [self.prompt_ids[i] for i in indices]
        t0 = time.perf_counter()
        completion_ids = self.rollout(self.step_config, frozen, lora, prompts, self.sampling,
                                      a.seed * 1_000_003 + round_index)
        rollout_time = time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        raw_prompts = [self.columns["prompt"][i] for i in indices]
        completions = ([[{"role": "assistant", "content": t}] for t in texts]
                       if is_conversational(raw_prompts[0]) else texts)
        columns = {k: [column[i] for i in indices] for k, column in self.columns.items()
                   if k not in ("prompt", "completion", "completion_ids")}
        per_func = score(self.reward_funcs, raw_prompts, completions, completion_ids, columns)
        adv, total, std = advantages(per_func, self.reward_weights, G, a.scale_rewards)
        n, P, C = len(prompts), self.prompt_width, a.max_completion_length
        ids = np.full((n, P + C), self.pad_id, np.int32)
        attention = np.zeros((n, P + C), np.int32)
        completion_mask = np.zeros((n, C), np.int32)
        truncated = np.zeros(n, bool)
        for r, (p, c) in enumerate(zip(prompts, completion_ids)):
            ids[r, P - len(p):P] = p
            attention[r, P - len(p):P] = 1
            ids[r, P:P + len(c)] = c
            completion_mask[r, :len(c)] = 1
            truncated[r] = not c or c[-1] not in self.eos_ids + (self.pad_id,)
        if a.mask_truncated_completions:
            completion_mask[truncated] = 0
        attention[:, P:] = completion_mask
        lengths = np.asarray([len(c) for c in completion_ids])
        stats = {"reward": float(np.nanmean(total)), "reward_std": float(nanstd(total)),
                 "frac_reward_zero_std": float(np.mean(np.isclose(np.nan_to_num(std), 0.0))),
                 "completions/mean_length": float(lengths.mean()),
                 "completions/min_length": float(lengths.min()),
                 "completions/max_length": float(lengths.max()),
                 "completions/clipped_ratio": float(truncated.mean()),
                 "time/rollout": rollout_time}
        for j, func in enumerate(self.reward_funcs):
            stats[f"rewards/{reward_name(func)}/mean"] = float(np.nanmean(per_func[:, j]))
            stats[f"rewards/{reward_name(func)}/std"] = float(nanstd(per_func[:, j]))
        samples = [{"prompt": raw_prompts[i], "completion": texts[i], "advantage": float(adv[i]),
                    "rewards": {reward_name(f): None if np.isnan(per_func[i, j]) else
                                float(per_func[i, j]) for j, f in enumerate(self.reward_funcs)}}
                   for i in range(min(a.num_completions_to_print, n))]
        return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion_mask,
                "advantages": adv.astype(np.float32), "stats": stats, "samples": samples,
                "tokens": float(attention.sum())}

    def _micro_batches(self, rollout: dict[str, Any], round_index: int, frozen: Any,
                       lora: Any) -> list[dict[str, np.ndarray]]:
        """Shuffle the round, split it into steps_per_generation micro-batches, and add the old
        and reference log-probs and the dapo normaliser."""
        a = self.args
        keys = ("input_ids", "attention_mask", "completion_mask", "advantages")
        order = np.random.default_rng([a.seed, round_index, 7]).permutation(len(rollout["advantages"]))
        data = {k: rollout[k][order] for k in keys}
        dapo_norm = float(data["completion_mask"].sum()) * a.gradient_accumulation_steps \
            / a.steps_per_generation
        B = a.per_device_train_batch_size
        micro = []
        for m in range(a.steps_per_generation):
            mb = {k: v[m * B:(m + 1) * B] for k, v in data.items()}
            score_args = dict(cfg=self.step_config, temperature=a.temperature,
                              completion_width=a.max_completion_length)
            if self.needs_old_logps:
                mb["old_logps"] = np.asarray(score_completions(
                    lora, frozen, jnp.asarray(mb["input_ids"]), jnp.asarray(mb["attention_mask"]),
                    **score_args))
            if a.beta != 0.0:
                mb["ref_logps"] = np.asarray(score_completions(
                    None, frozen, jnp.asarray(mb["input_ids"]), jnp.asarray(mb["attention_mask"]),
                    **score_args))
            mb["dapo_normalizer"] = np.float32(dapo_norm)
            micro.append(mb)
        return micro

    def train(self, resume_from_checkpoint: bool | str = False) -> dict[str, Any]:
        """Run to total_steps optimizer steps; returns stats. A resume that lands inside a round
        regenerates that round with the restored policy (as TRL does)."""
        a = self.args
        run = TrainRun(self.model, a, self.optimizer, self.total_steps, resume_from_checkpoint,
                       curves=("loss", "reward", "kl", "completions/mean_length"))
        completions_log = open(run.out_dir / "completions.jsonl", "a" if run.start else "w")
        GA = a.gradient_accumulation_steps
        history, rewards = [], []
        micro, rollout, loaded_round = None, None, None
        t0 = time.perf_counter()
        try:
            for step in range(run.start, self.total_steps):
                round_index, within = divmod(step, self.steps_per_round)
                if loaded_round != round_index:
                    rollout = self.generate_round(round_index, run.frozen, run.lora)
                    micro = self._micro_batches(rollout, round_index, run.frozen, run.lora)
                    loaded_round = round_index
                    rewards.append(rollout["stats"]["reward"])
                picks = [(within * GA + g) % a.steps_per_generation for g in range(GA)]
                batch = {k: jnp.asarray(np.stack([micro[i][k] for i in picks]))
                         for k in micro[0]}
                t1 = time.perf_counter()
                lora, opt_state, metrics = update_step(
                    run.lora, run.opt_state, run.frozen, batch, objective=self.objective,
                    optimizer=self.optimizer, dropout_key=run.dropout_key(step))
                m = run.accept(step, metrics, lora, opt_state)
                m["time/update"] = time.perf_counter() - t1
                record = dict(m, **rollout["stats"], epoch=round_index * a.prompts_per_generation
                              / self.num_rows)
                history.append(record)
                if run.after_step(step + 1, record, rollout["tokens"] / self.steps_per_round) \
                        and a.log_completions:
                    for sample in rollout["samples"]:
                        completions_log.write(json.dumps(dict(sample, step=step + 1)) + "\n")
                    completions_log.flush()
        finally:
            completions_log.close()
            run.close()
        stats = {"global_step": self.total_steps, "start_step": run.start,
                 "train_runtime": time.perf_counter() - t0,
                 "train_loss": float(np.mean([h["loss"] for h in history])) if history else math.nan,
                 "first_reward": rewards[0] if rewards else math.nan,
                 "last_reward": rewards[-1] if rewards else math.nan}
        write_text_atomic(run.out_dir / "train_stats.json", json.dumps(stats, indent=2))
        return stats
