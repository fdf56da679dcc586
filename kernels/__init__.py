"""Pallas kernels (installed as `fastlora_jax.kernels`), each with a pure-jnp reference beside it."""
