"""Which implementation of an op runs: an enum and the per-platform default."""

from __future__ import annotations

import enum

import jax


class Impl(enum.Enum):
    """Implementation choice for an op. `None` anywhere means "the platform default"."""

    PALLAS = "pallas"        # our Pallas kernels (GPU)
    CUDNN = "cudnn"          # cuDNN through jax.nn.dot_product_attention (GPU, attention only)
    XLA = "xla"              # plain XLA ops
    REFERENCE = "reference"  # the pure-jnp definition of the math (float32 inside)


def platform() -> str:
    """The default backend's platform name: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def resolve(impl: Impl | str | None, *, gpu_default: Impl, cpu_default: Impl) -> Impl:
    """Turn a user choice (enum, its value, or None) into an Impl."""
    if impl is None:
        return gpu_default if platform() == "gpu" else cpu_default
    if isinstance(impl, str):
        try:
            return Impl(impl)
        except ValueError:
            raise ValueError(f"impl={impl!r} is not one of {[i.value for i in Impl]}") from None
    return impl
