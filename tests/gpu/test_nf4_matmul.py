"""Fused NF4 / int8 matmul kernels compiled on the GPU vs their references (skipped without GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from fastlora_jax.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from fastlora_jax.ops import Impl, linear
from fastlora_jax.quant import quantize_int8, quantize_nf4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

# The Hopper (Mosaic GPU, wgmma) kernels.
NEEDS_SM90 = pytest.mark.skipif(jax.default_backend() == "gpu"
                                and "H100" not in jax.devices()[0].device_kind
                                and "H200" not in jax.devices()[0].device_kind,
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


# Decode (1, 16), odd M / N, K not a multiple of the default block_k (320, 4160 = 65 x 64),
# and one real projection shape.
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("m,k,n", [(1, 4096, 1024), (16, 4160, 520), (37, 320, 200),
                                   (300, 1024, 96), (512, 4096, 1024)])
def test_forward_and_grad_on_gpu(kind: str, m: int, k: int, n: int) -> None:
    quantize, op, ref = KINDS[kind]
    _check_forward_and_grad(op, ref, quantize, m, k, n, seed=m * 7 + n)


@pytest.mark.parametrize("kind", list(KINDS))
def test_linear_default_and_pallas_on_gpu(kind: str) -> None:
    quantize, _, ref = KINDS[kind]
    rng = np.random.default_rng(11)
    w = jax.tree_util.tree_map(jnp.asarray, quantize(
        rng.standard_normal((256, 512), dtype=np.float32) * 0.05, dtype="bfloat16"))
    for m in (1, 8, 128):
        x = jnp.asarray(rng.standard_normal((m, 512), dtype=np.float32), jnp.bfloat16)
        for impl in (None, Impl.PALLAS, Impl.XLA):
            assert _rel(jax.jit(lambda x: linear(x, w, impl=impl))(x), ref(x, w)) <= 1e-2


# The Hopper Mosaic GPU forward (wgmma with the decoded weight in registers, inline-PTX lookup):
# decode and training-like M, odd N (pads to 64 rows), K not a multiple of 128, split-K.
@NEEDS_SM90
@pytest.mark.parametrize("m,k,n,tile_m,splits,bps", [(1, 4096, 1024, 8, None, 1),
                                                     (16, 4160, 520, 16, None, 1),
                                                     (37, 320, 200, 40, 1, 1),
                                                     (300, 1024, 96, 128, 2, 1),
                                                     (1, 4096, 1024, 8, None, 2),
                                                     (16, 4224, 520, 16, None, 2),
                                                     (5, 2048, 200, 8, 2, 4),
                                                     (9, 4096, 136, 16, None, 8)])
def test_mgpu_forward_on_gpu(m: int, k: int, n: int, tile_m: int, splits, bps: int) -> None:
    _check_mgpu("nf4", m, k, n, tile_m, splits, bps, grad=False)


# The same with each block's absmax applied to its float32 partial product (MgpuTuning.acc_scale).
@NEEDS_SM90
@pytest.mark.parametrize("m,k,n,tile_m,splits,bps", [(1, 4096, 1024, 8, None, 2),
                                                     (16, 4160, 520, 16, None, 1),
                                                     (37, 320, 200, 40, 1, 1),
                                                     (5, 2048, 200, 8, 2, 4)])
def test_mgpu_acc_scale_forward_on_gpu(m: int, k: int, n: int, tile_m: int, splits,
                                       bps: int) -> None:
    _check_mgpu("nf4", m, k, n, tile_m, splits, bps, grad=False, acc_scale=True)


def _check_mgpu(kind: str, m: int, k: int, n: int, tile_m: int, splits, bps: int,
                grad: bool, acc_scale: bool = False) -> None:
    """A Mosaic GPU forward (MgpuTuning) against its reference; with `grad`, also jax.grad."""
    from fastlora_jax.kernels.weight_stream_mgpu import MgpuTuning
    quantize, op, ref = KINDS[kind]
    rng = np.random.default_rng(m * 5 + n + len(kind))
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    w = jax.tree_util.tree_map(jnp.asarray, quantize(
        rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16"))
    t = MgpuTuning(tile_m=tile_m, splits=splits, blocks_per_step=bps, acc_scale=acc_scale)
    y = jax.jit(lambda x: op(x, w, tuning=t))(x)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, ref(x, w)) <= 1e-2
    if grad:
        g = jax.grad(lambda x: jnp.sum(op(x, w, tuning=t).astype(jnp.float32) ** 2))(x)
        g_ref = jax.grad(lambda x: jnp.sum(ref(x, w).astype(jnp.float32) ** 2))(x)
        assert _rel(g, g_ref) <= 1e-2


# The Hopper int8 forward on the same skeleton (kernels/int8_matmul_mgpu.py): decode and larger M,
# odd N, split-K, several blocks per step, and its gradient (the Triton dx kernel).
@NEEDS_SM90
@pytest.mark.parametrize("m,k,n,tile_m,splits,bps", [(1, 4096, 1024, 8, None, 2),
                                                     (16, 4224, 520, 16, None, 1),
                                                     (37, 320, 200, 40, 1, 1),
                                                     (300, 1024, 96, 128, 2, 4)])
def test_int8_mgpu_forward_on_gpu(m: int, k: int, n: int, tile_m: int, splits, bps: int) -> None:
    _check_mgpu("int8", m, k, n, tile_m, splits, bps, grad=True)


# The bandwidth-bound dequantization kernel (kernels/nf4_dequant.py): odd N, a ragged
# N*K % 64 != 0 weight, a masked last tile, bf16 and fp16. With the absmax decoded in the kernel
# it must equal the reference bit for bit (evaluated eagerly on the CPU: no FMA contraction);
# with the absmax decoded by XLA (default) it must equal XLA's own jitted dequantize on the GPU.
def _cpu_dequantize(w, dtype):
    from fastlora_jax.quant import dequantize
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(dequantize(jax.tree_util.tree_map(np.asarray, w), dtype))


@pytest.mark.parametrize("n,k,rows", [(33, 192, 64), (37, 448, 64), (1031, 4096, None),
                                      (3, 40, 16)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("in_kernel", [False, True], ids=["xla_absmax", "kernel_absmax"])
def test_dequant_kernel_bit_exact_on_gpu(n: int, k: int, rows, dtype: str,
                                         in_kernel: bool) -> None:
    from fastlora_jax.kernels.nf4_dequant import DequantTuning, nf4_dequantize
    from fastlora_jax.quant import dequantize
    rng = np.random.default_rng(n + k)
    wq = quantize_nf4(rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16")
    w = jax.tree_util.tree_map(jnp.asarray, wq)
    t = DequantTuning(absmax_in_kernel=in_kernel, **({} if rows is None else
                                                     dict(block_rows=rows, num_warps=4)))
    got = np.asarray(jax.jit(lambda w: nf4_dequantize(w, dtype, tuning=t))(w)).view(np.uint16)
    want = (_cpu_dequantize(wq, dtype) if in_kernel
            else np.asarray(jax.jit(lambda w: dequantize(w, dtype))(w))).view(np.uint16)
    assert got.shape == (n, k)
    assert np.array_equal(got, want), f"{np.mean(got != want):.2e} of the weights differ"
    if dtype == "bfloat16":  # the fast path: within ~1.5 bf16 ulp of the reference
        fast = np.asarray(jax.jit(lambda w: nf4_dequantize(w, tuning=DequantTuning(
            exact=False, absmax_in_kernel=in_kernel)))(w), np.float32)
        ref = _cpu_dequantize(wq, dtype).astype(np.float32)
        assert np.all(np.abs(fast - ref) <= 3 * 2.0 ** -8 * np.abs(ref))


@pytest.mark.parametrize("m,k,n", [(300, 1024, 96), (512, 4096, 1031)])
def test_dequant_then_dot_and_linear_option_on_gpu(m: int, k: int, n: int) -> None:
    from fastlora_jax.kernels.nf4_dequant import dequant_then_dot
    from fastlora_jax.ops.linear import Dequant
    x, w = _check_forward_and_grad(lambda x, w: dequant_then_dot(x, w), nf4_matmul_reference,
                                   quantize_nf4, m, k, n, seed=m + n)
    y_lin = jax.jit(lambda x: linear(x, w, dequant=Dequant.PALLAS))(x)
    assert _rel(y_lin, nf4_matmul_reference(x, w)) <= 1e-2
