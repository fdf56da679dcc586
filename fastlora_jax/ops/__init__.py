"""Op dispatch: model code calls these; the implementation is picked per platform or by `impl`."""

from fastlora_jax.ops.attention import attention
from fastlora_jax.ops.impl import Impl
from fastlora_jax.ops.linear import linear

__all__ = ["Impl", "attention", "linear"]
