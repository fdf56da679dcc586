"""The Hopper NF4 matmul (kernels/nf4_matmul_mgpu.py) on the CPU: under Mosaic GPU's interpreter
(a jnp decode replaces the inline PTX, and A goes through shared memory: the interpreter's wgmma
takes no register operand) against its reference, its gradient (the Triton dx kernel), its
default tuning and the launch plan's checks. tests/kernels/test_mosaic_lowering.py pins the GPU
module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_matmul import nf4_matmul_reference
from fastlora_jax.kernels.nf4_matmul_mgpu import MosaicMatmulTuning, nf4_matmul_mosaic, plan
from fastlora_jax.kernels.quant_matmul_common import split_k
from fastlora_jax.ops import defaults
from fastlora_jax.quant import quantize_nf4


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _case(m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    w = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(
        rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16"))
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    return x, w


def _tuning(tile_m: int, bps: int = 1, depth: int = 4, splits: int | None = None):
    return MosaicMatmulTuning(tile_m=tile_m, max_concurrent_steps=depth, blocks_per_step=bps,
                              splits=splits)


# Odd N (pads to 64 rows), M not a multiple of tile_m (several x tiles), split-K (odd too),
# several blocks per step, a shallow pipeline, and the default tuning.
@pytest.mark.parametrize("m,k,n,tuning", [(3, 256, 72, None),
                                          (20, 384, 130, _tuning(8, splits=3)),
                                          (33, 128, 64, _tuning(16, depth=2)),
                                          (20, 512, 130, _tuning(8, bps=4)),
                                          (3, 256, 72, _tuning(8, bps=2, splits=2)),
                                          (17, 384, 72, _tuning(24, splits=3))])
def test_interpreted_matches_reference(m, k, n, tuning) -> None:
    x, w = _case(m, k, n, seed=m + n)
    y = nf4_matmul_mosaic(x, w, tuning=tuning, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, nf4_matmul_reference(x, w)) <= 1e-2


def test_gradient_is_the_dx_kernels() -> None:
    x, w = _case(5, 256, 96, seed=3)
    ct = jnp.asarray(np.random.default_rng(4).standard_normal((5, 96), dtype=np.float32),
                     jnp.bfloat16)

    def loss(op):
        return lambda x: jnp.sum((op(x) * ct).astype(jnp.float32))

    g = jax.grad(loss(lambda x: nf4_matmul_mosaic(x, w, interpret=True)))(x)
    g_ref = jax.grad(loss(lambda x: nf4_matmul_reference(x, w)))(x)
    assert _rel(g, g_ref) <= 1e-2


def test_default_tuning_follows_the_table() -> None:
    t = MosaicMatmulTuning.for_m(1, 4096)
    assert (t.tile_m, t.max_concurrent_steps, t.blocks_per_step) == (8, defaults.MOSAIC_NF4_DEPTH,
                                                                    4)
    assert MosaicMatmulTuning.for_m(16, 128).blocks_per_step == 2   # K/64 = 2
    assert MosaicMatmulTuning.for_m(9, 192).blocks_per_step == 1    # K/64 = 3 is odd
    assert MosaicMatmulTuning.for_m(32, 4096).blocks_per_step == 2  # 32 x 4 accumulators: too many
    assert MosaicMatmulTuning.for_m(64, 4096).tile_m == 64


def test_split_k_aims_at_the_cta_target() -> None:
    target = defaults.MOSAIC_SPLIT_CTAS
    assert split_k(224, 32, target) == 8     # 4096 x 14336, 2 blocks per step: 1792 CTAs
    assert split_k(224, 33, target) == 1     # an odd step count cannot be split
    assert split_k(2, 256, target) == 16     # capped at 16
    assert split_k(224, 16, defaults.TRITON_SPLIT_PROGRAMS) == 2


def test_plan_and_tuning_checks() -> None:
    grid = plan(14336, 8, 64, _tuning(8, bps=2))
    assert (grid.n_tiles, grid.m_tiles, grid.splits, grid.steps) == (224, 1, 8, 4)
    with pytest.raises(KernelError, match="blocks_per_step=4 must divide K/64=6"):
        plan(64, 8, 6, _tuning(8, bps=4))
    with pytest.raises(KernelError, match="splits=4 must divide"):
        plan(64, 8, 6, _tuning(8, splits=4))
    with pytest.raises(KernelError, match=r"tile_m \* blocks_per_step <= 64"):
        _tuning(16, bps=8)
    with pytest.raises(KernelError, match="tile_m=12"):
        _tuning(12)
    with pytest.raises(KernelError, match="blocks_per_step=3"):
        _tuning(8, bps=3)


def test_checks_its_inputs() -> None:
    x, w = _case(4, 128, 64, seed=5)
    with pytest.raises(KernelError, match="must be bfloat16"):
        nf4_matmul_mosaic(x.astype(jnp.float32), w, interpret=True)
    x, w = _case(65, 128, 64, seed=5)
    with pytest.raises(KernelError, match="M=65"):
        nf4_matmul_mosaic(x, w, interpret=True)
