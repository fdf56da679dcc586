"""Compiler parameters shared by the Mosaic GPU kernels, with Mosaic GPU's in-kernel profiler.

With a profile directory, every launch of a kernel writes one Chrome-trace JSON there: for each
CTA and warpgroup, the begin/end times of the kernel's `jax.named_scope` regions (the first
PROFILE_EVENTS events of each warpgroup; later ones are dropped). `benchmarks/mgpu_trace.py`
summarises such traces: time per region, per warpgroup role.
"""

from __future__ import annotations

from jax.experimental.pallas import mosaic_gpu as plgpu

# Profiler events kept per warpgroup (a region is two). Mosaic GPU keeps them in shared memory,
# 4 words each, beside the kernel's own buffers: small enough for the attention kernels' budget.
PROFILE_EVENTS = 128


def compiler_params(profile_dir: str = "", *, approx_math: bool = False
                    ) -> plgpu.CompilerParams:
    """Mosaic GPU compiler parameters; `profile_dir` ("" = off) turns on the profiler."""
    if not profile_dir:
        return plgpu.CompilerParams(approx_math=approx_math)
    return plgpu.CompilerParams(approx_math=approx_math, profile_space=PROFILE_EVENTS,
                                profile_dir=profile_dir, profile_bounds_check=True)
