"""The quantized matmul kernels compiled on the GPU vs their references (skipped without GPU):
the fused NF4 / int8 Triton kernels, the Hopper NF4 Mosaic GPU forward, the NF4 dequantization
kernel, and ops.linear through each implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from fastlora_jax.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from fastlora_jax.ops import Impl, linear
from fastlora_jax.ops.impl import is_hopper
from fastlora_jax.quant import quantize_int8, quantize_nf4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

# The Hopper (Mosaic GPU, wgmma) kernels.
NEEDS_SM90 = pytest.mark.skipif(jax.default_backend() == "gpu" and not is_hopper(),
                                reason="needs sm_90")

KINDS = {"nf4": (quantize_nf4, nf4_matmul, nf4_matmul_reference),
         "int8": (quantize_int8, int8_matmul, int8_matmul_reference)}


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _check_forward_and_grad(op, ref, quantize, m: int, k: int, n: int, seed: int):
    """op(x, w) (jitted) against ref on fresh random bf16 x [m, k] and a quantized w [n, k]:
    bf16 output, and jax.grad w.r.t. x, both within 1e-2 relative error. Returns (x, w)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    w = jax.tree_util.tree_map(jnp.asarray, quantize(
        rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16"))
    y = jax.jit(lambda x, w: op(x, w))(x, w)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, ref(x, w)) <= 1e-2

    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(f):
        return lambda x: (f(x).astype(jnp.float32) * ct).sum()

    g = jax.jit(jax.grad(loss(lambda x: op(x, w))))(x)
    g_ref = jax.grad(loss(lambda x: ref(x, w)))(x)
    assert g.shape == x.shape and _rel(g, g_ref) <= 1e-2
    return x, w


# Decode (1, 16), odd M / N, K not a multiple of the default block_k (320, 4160 = 65 x 64); int8
# also at training-like M (its forward takes any M).
@pytest.mark.parametrize("kind,m,k,n", [(kind, *shape) for kind in KINDS
                                        for shape in ((1, 4096, 1024), (16, 4160, 520),
                                                      (37, 320, 200), (64, 4096, 1024))]
                         + [("int8", 300, 1024, 96)])
def test_forward_and_grad_on_gpu(kind: str, m: int, k: int, n: int) -> None:
    quantize, op, ref = KINDS[kind]
    _check_forward_and_grad(op, ref, quantize, m, k, n, seed=m * 7 + n)


@pytest.mark.parametrize("kind", list(KINDS))
def test_linear_every_impl_on_gpu(kind: str) -> None:
    quantize, _, ref = KINDS[kind]
    rng = np.random.default_rng(11)
    w = jax.tree_util.tree_map(jnp.asarray, quantize(
        rng.standard_normal((256, 512), dtype=np.float32) * 0.05, dtype="bfloat16"))
    impls = [None, Impl.PALLAS_TRITON, Impl.XLA] + ([Impl.PALLAS_MOSAIC] if is_hopper() else [])
    for m in (1, 8, 128, 3000):
        x = jnp.asarray(rng.standard_normal((m, 512), dtype=np.float32), jnp.bfloat16)
        for impl in impls:
            assert _rel(jax.jit(lambda x: linear(x, w, impl=impl))(x), ref(x, w)) <= 1e-2, impl


# The Hopper Mosaic GPU forward (wgmma with the decoded weight in registers, inline-PTX lookup):
# decode M, odd N (pads to 64 rows), K not a multiple of 128, split-K, 1 to 8 blocks per step,
# and its gradient (the Triton dx kernel).
@NEEDS_SM90
@pytest.mark.parametrize("m,k,n,tile_m,splits,bps", [(1, 4096, 1024, 8, None, 4),
                                                     (16, 4160, 520, 16, None, 1),
                                                     (37, 320, 200, 40, 1, 1),
                                                     (1, 4096, 1024, 8, None, 2),
                                                     (16, 4224, 520, 16, None, 2),
                                                     (5, 2048, 200, 8, 2, 4),
                                                     (9, 4096, 136, 8, None, 8),
                                                     (64, 1024, 96, 64, 2, 1)])
def test_mosaic_forward_on_gpu(m: int, k: int, n: int, tile_m: int, splits, bps: int) -> None:
    from fastlora_jax.kernels.nf4_matmul_mgpu import MosaicMatmulTuning, nf4_matmul_mosaic
    t = MosaicMatmulTuning(tile_m=tile_m, max_concurrent_steps=4, blocks_per_step=bps,
                           splits=splits)
    _check_forward_and_grad(lambda x, w: nf4_matmul_mosaic(x, w, tuning=t), nf4_matmul_reference,
                            quantize_nf4, m, k, n, seed=m * 5 + n)


# The dequantization kernel (kernels/nf4_dequant.py): odd N, a ragged N*K % 64 != 0 weight, a
# masked last tile, bf16 and fp16. It must equal XLA's own jitted dequantize on the GPU (the
# absmax is decoded by XLA in both).
@pytest.mark.parametrize("n,k,rows", [(33, 192, 64), (37, 448, 64), (1031, 4096, None),
                                      (3, 40, 16)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dequant_kernel_bit_exact_on_gpu(n: int, k: int, rows, dtype: str) -> None:
    from fastlora_jax.kernels.nf4_dequant import DequantTuning, nf4_dequantize
    from fastlora_jax.quant import dequantize
    rng = np.random.default_rng(n + k)
    wq = quantize_nf4(rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16")
    w = jax.tree_util.tree_map(jnp.asarray, wq)
    t = None if rows is None else DequantTuning(block_rows=rows, num_warps=4)
    got = np.asarray(jax.jit(lambda w: nf4_dequantize(w, dtype, tuning=t))(w)).view(np.uint16)
    want = np.asarray(jax.jit(lambda w: dequantize(w, dtype))(w)).view(np.uint16)
    assert got.shape == (n, k)
    assert np.array_equal(got, want), f"{np.mean(got != want):.2e} of the weights differ"


@pytest.mark.parametrize("m,k,n", [(300, 1024, 96), (512, 4096, 1031)])
def test_dequant_then_dot_on_gpu(m: int, k: int, n: int) -> None:
    from fastlora_jax.kernels.nf4_dequant import dequant_then_dot
    _check_forward_and_grad(lambda x, w: dequant_then_dot(x, w), nf4_matmul_reference,
                            quantize_nf4, m, k, n, seed=m + n)
