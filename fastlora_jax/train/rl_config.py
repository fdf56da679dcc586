"""`GRPOConfig` and `DPOConfig`: TRL's argument names, meanings and defaults on top of the shared
`TrainingArguments` (batch, accumulation, optimizer, schedule, checkpoints, logging).

GRPO batch semantics are TRL's: `per_device_train_batch_size` counts completions per
micro-batch; one generation round samples `generation_batch_size` completions
(= per_device_train_batch_size x steps_per_generation, default steps_per_generation =
gradient_accumulation_steps), i.e. generation_batch_size / num_generations prompts with
num_generations completions each; the round is shuffled, split into steps_per_generation
micro-batches and trained on num_iterations times. Here a round must cover whole optimizer steps:
steps_per_generation x num_iterations a multiple of gradient_accumulation_steps.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fastlora_jax.errors import ConfigError
from fastlora_jax.train.args import TrainingArguments
from fastlora_jax.train.dpo_loss import DPO_LOSS_TYPES
from fastlora_jax.train.grpo_loss import IMPORTANCE_LEVELS, LOSS_TYPES

ScaleRewards = Literal["group", "batch", "none"]


@dataclasses.dataclass
class GRPOConfig(TrainingArguments):
    """GRPO knobs (TRL's names). See the module docstring for the batch arithmetic."""

    learning_rate: float = 1e-6
    num_generations: int = 8
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    scale_rewards: bool | ScaleRewards = "group"   # TRL's True = "group", False = "none"
    reward_weights: list[float] | None = None
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True
    log_completions: bool = True
    num_completions_to_print: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards,
                                                                  self.scale_rewards)
        checks = [(self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r} must be one of "
                                                 f"{list(LOSS_TYPES)}"),
                  (self.importance_sampling_level in IMPORTANCE_LEVELS,
                   f"importance_sampling_level={self.importance_sampling_level!r} must be one of "
                   f"{list(IMPORTANCE_LEVELS)}"),
                  (self.num_generations >= 2,
                   f"num_generations={self.num_generations}: GRPO needs at least 2 generations "
                   f"per prompt to compute group-relative advantages"),
                  (self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1"),
                  (self.max_completion_length >= 1,
                   f"max_completion_length={self.max_completion_length} must be >= 1"),
                  (self.beta >= 0, f"beta={self.beta} must be >= 0"),
                  (self.epsilon > 0, f"epsilon={self.epsilon} must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("generation_batch_size and steps_per_generation cannot both be set")
        if self.generation_batch_size is not None:
            if self.generation_batch_size % self.per_device_train_batch_size:
                raise ConfigError(f"generation_batch_size={self.generation_batch_size} must be a "
                                  f"multiple of per_device_train_batch_size="
                                  f"{self.per_device_train_batch_size}")
            self.steps_per_generation = (self.generation_batch_size
                                         // self.per_device_train_batch_size)
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        self.generation_batch_size = self.per_device_train_batch_size * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            raise ConfigError(
                f"generation batch of {self.generation_batch_size} completions "
                f"(per_device_train_batch_size={self.per_device_train_batch_size} x "
                f"steps_per_generation={self.steps_per_generation}) is not divisible by "
                f"num_generations={self.num_generations}; every prompt needs its whole group")
        if (self.steps_per_generation * self.num_iterations) % self.gradient_accumulation_steps:
            raise ConfigError(
                f"steps_per_generation={self.steps_per_generation} x num_iterations="
                f"{self.num_iterations} must be a multiple of gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps} (a generation round covers whole optimizer "
                f"steps)")

    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations


@dataclasses.dataclass
class DPOConfig(TrainingArguments):
    """DPO knobs (TRL's names). per_device_train_batch_size counts preference pairs."""

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: list[str] | str = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"
    precompute_ref_log_probs: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if unknown:
            raise ConfigError(f"loss_type {unknown} not supported; choose from "
                              f"{list(DPO_LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"loss_weights has {len(self.loss_weights)} entries for "
                              f"{len(self.loss_type)} loss types")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} must be > 0")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ConfigError(f"truncation_mode={self.truncation_mode!r} must be 'keep_start' "
                              f"or 'keep_end'")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
