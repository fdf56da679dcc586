"""fastlora_jax: LoRA/QLoRA fine-tuning on JAX/XLA with Pallas GPU kernels."""

from fastlora_jax.api import FastLanguageModel
from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import (CheckpointError, ConfigError, DataError, ExportError,
                                 FastLoRAError, KernelError)
from fastlora_jax.models.causal_lm import CausalLM, apply, split

__version__ = "0.1.0"

__all__ = ["FastLanguageModel", "ModelConfig", "CausalLM", "split", "apply", "FastLoRAError",
           "ConfigError", "CheckpointError", "DataError", "ExportError", "KernelError"]
