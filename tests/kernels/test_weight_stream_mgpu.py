"""The Hopper weight-streaming matmuls (kernels/weight_stream_mgpu.py: NF4 and int8) on the CPU:
the int8 kernel under Mosaic GPU's interpreter against its reference, its gradient through
int8_matmul, both kernels lowered for CUDA (the GPU-only register-operand path), and the
launch plan's checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from fastlora_jax.kernels.int8_matmul_mgpu import int8_matmul_mgpu
from fastlora_jax.kernels.nf4_matmul import nf4_matmul
from fastlora_jax.kernels.weight_stream_mgpu import MgpuTuning, plan
from fastlora_jax.quant import quantize_int8, quantize_nf4


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _int8_case(m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    w = jax.tree_util.tree_map(jnp.asarray, quantize_int8(
        rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16"))
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    return x, w


# Odd N (pads to 64 rows), M not a multiple of tile_m, split-K, several blocks per step.
@pytest.mark.parametrize("m,k,n,tuning", [(3, 256, 72, MgpuTuning(tile_m=8)),
                                          (20, 512, 130, MgpuTuning(tile_m=8, blocks_per_step=2,
                                                                    splits=2)),
                                          (33, 128, 64, MgpuTuning(tile_m=40,
                                                                   max_concurrent_steps=2))])
def test_int8_mgpu_interpreted_matches_reference(m, k, n, tuning) -> None:
    x, w = _int8_case(m, k, n, seed=m + n)
    y = int8_matmul(x, w, tuning=tuning, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, int8_matmul_reference(x, w)) <= 1e-2


def test_int8_mgpu_forward_keeps_the_gradient() -> None:
    x, w = _int8_case(5, 256, 96, seed=3)
    ct = jnp.asarray(np.random.default_rng(4).standard_normal((5, 96), dtype=np.float32),
                     jnp.bfloat16)

    def loss(op):
        return lambda x: jnp.sum((op(x) * ct).astype(jnp.float32))

    g = jax.grad(loss(lambda x: int8_matmul(x, w, tuning=MgpuTuning(tile_m=8),
                                            interpret=True)))(x)
    g_ref = jax.grad(loss(lambda x: int8_matmul_reference(x, w)))(x)
    assert _rel(g, g_ref) <= 1e-2


def test_int8_mgpu_checks_its_inputs() -> None:
    x, w = _int8_case(4, 96, 64, seed=5)
    with pytest.raises(KernelError, match="K=96 must be a multiple of 64"):
        int8_matmul_mgpu(x, w.codes, w.scale, 64, interpret=True)
    x, w = _int8_case(4, 128, 64, seed=5)
    with pytest.raises(KernelError, match="must be bfloat16"):
        int8_matmul_mgpu(x.astype(jnp.float32), w.codes, w.scale, 64, interpret=True)
    with pytest.raises(KernelError, match=r"must be int8\[64, 128\]"):
        int8_matmul_mgpu(x, w.codes.astype(jnp.int32), w.scale, 64, interpret=True)


def test_plan_checks_blocks_and_splits() -> None:
    grid = plan("k", 14336, 8, 64, MgpuTuning(tile_m=8, blocks_per_step=2))
    assert (grid.n_tiles, grid.m_tiles, grid.splits, grid.steps) == (224, 1, 8, 4)
    with pytest.raises(KernelError, match="blocks_per_step=4 must divide K/64=6"):
        plan("k", 64, 8, 6, MgpuTuning(tile_m=8, blocks_per_step=4))
    with pytest.raises(KernelError, match="splits=4 must divide"):
        plan("k", 64, 8, 6, MgpuTuning(tile_m=8, splits=4))
    with pytest.raises(KernelError, match="acc_scale needs tile_m \\* blocks_per_step <= 64"):
        MgpuTuning(tile_m=16, blocks_per_step=8, acc_scale=True)


@pytest.mark.parametrize("kind,acc_scale", [("nf4", False), ("nf4", True), ("int8", False)])
@pytest.mark.parametrize("bps", [1, 2, 4])
def test_mgpu_kernels_lower_for_cuda(kind: str, acc_scale: bool, bps: int) -> None:
    """The GPU path (inline-PTX NF4 decode or the int8 conversion, A in registers) lowers."""
    rng = np.random.default_rng(bps)
    quantize = quantize_nf4 if kind == "nf4" else quantize_int8
    op = nf4_matmul if kind == "nf4" else int8_matmul
    w = jax.tree_util.tree_map(jnp.asarray, quantize(
        rng.standard_normal((256, 1024), dtype=np.float32) * 0.05, dtype="bfloat16"))
    x = jax.ShapeDtypeStruct((16, 1024), jnp.bfloat16)
    t = MgpuTuning(tile_m=16, blocks_per_step=bps, acc_scale=acc_scale)
    text = jax.jit(lambda x, w: op(x, w, tuning=t, interpret=False)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
