"""Which implementation of an op runs: the one user-facing choice, and the platform facts the
default rules (`ops/defaults.py`) read."""

from __future__ import annotations

import enum

import jax

from fastlora_jax.errors import KernelError


class Impl(enum.Enum):
    """Implementation of an op. Every op takes `impl=None` (the default): the measured best for
    the platform and the shape, as `ops/defaults.py` records it."""

    XLA = "xla"                      # plain XLA ops
    CUDNN = "cudnn"                  # cuDNN through jax.nn.dot_product_attention (attention only)
    REFERENCE = "reference"          # the pure-jnp definition of the math (float32 inside)
    PALLAS_TRITON = "pallas_triton"  # our Pallas kernels, Triton lowering (any CUDA GPU)
    PALLAS_MOSAIC = "pallas_mosaic"  # our Mosaic GPU kernels (Hopper), Triton ones where none

    @property
    def pallas(self) -> bool:
        return self in (Impl.PALLAS_TRITON, Impl.PALLAS_MOSAIC)


def platform() -> str:
    """The default backend's platform name: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def on_gpu() -> bool:
    return platform() == "gpu"


def is_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x: H100, H200, H800,
    H20, GH200), the one the Mosaic GPU kernels (wgmma, TMA) are written for."""
    return on_gpu() and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def interpreted() -> bool:
    """Pallas kernels run under their interpreter everywhere but on a GPU (CPU tests)."""
    return not on_gpu()


def as_impl(impl: Impl | str | None, op: str) -> Impl | None:
    """A user's choice (the enum, its value, or None) as an Impl (None stays None)."""
    if impl is None or isinstance(impl, Impl):
        return impl
    try:
        return Impl(impl)
    except ValueError:
        raise KernelError(f"{op}: impl={impl!r} is not one of "
                          f"{[i.value for i in Impl]} or None (the measured default)") from None


def check_mosaic_device(op: str) -> None:
    """Impl.PALLAS_MOSAIC needs a Hopper GPU (or the CPU, where it is interpreted)."""
    if on_gpu() and not is_hopper():
        raise KernelError(f"{op}: impl=pallas_mosaic needs a Hopper GPU (sm_90); this device is "
                          f"{jax.devices()[0].device_kind}. Use impl=pallas_triton or None")
