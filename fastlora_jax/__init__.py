"""fastlora_jax: LoRA/QLoRA fine-tuning on JAX/XLA with Pallas GPU kernels."""

__version__ = "0.1.0"
