"""fastlora_jax: LoRA/QLoRA fine-tuning on JAX/XLA with Pallas GPU kernels."""

from fastlora_jax.api import FastLanguageModel, FastVisionModel
from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import (CheckpointError, ConfigError, DataError, ExportError,
                                 FastLoRAError, GenerationError, KernelError, TrainingError)
from fastlora_jax.models.causal_lm import CausalLM, apply, split
from fastlora_jax.train.args import TrainingArguments
from fastlora_jax.train.dpo_trainer import DPOTrainer
from fastlora_jax.train.grpo_trainer import GRPOTrainer
from fastlora_jax.train.rl_config import DPOConfig, GRPOConfig
from fastlora_jax.train.trainer import SFTTrainer
from fastlora_jax.vision import VisionLM

__version__ = "0.1.0"

__all__ = ["FastLanguageModel", "FastVisionModel", "VisionLM", "ModelConfig", "CausalLM", "split", "apply", "SFTTrainer",
           "TrainingArguments", "GRPOTrainer", "GRPOConfig", "DPOTrainer", "DPOConfig",
           "FastLoRAError", "ConfigError", "CheckpointError", "DataError",
           "ExportError", "GenerationError", "KernelError", "TrainingError"]
