"""LoRA / DoRA adapters: configuration, parameter trees, the adapted projection, merging."""

from fastlora_jax.lora.layer import init_lora, lora_project, merge, with_constants
from fastlora_jax.lora.spec import PROJECTIONS, LoraConfig, LoraSpec, projections, resolve

__all__ = ["LoraConfig", "LoraSpec", "PROJECTIONS", "projections", "init_lora", "lora_project",
           "merge", "resolve", "with_constants"]
