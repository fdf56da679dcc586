"""Format converters (installed as `fastlora_jax.converters`): HF checkpoints in, PEFT / merged out."""
