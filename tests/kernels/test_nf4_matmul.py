"""The fused NF4 / int8 matmul kernels (Triton backend) vs their references, interpreted on the
CPU (odd shapes included), and ops.linear's dispatch over them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from fastlora_jax.kernels.nf4_matmul import nf4_matmul, nf4_matmul_dx, nf4_matmul_reference
from fastlora_jax.kernels.quant_matmul_common import TritonMatmulTuning
from fastlora_jax.ops import Impl, defaults, linear
from fastlora_jax.quant import QuantKind, dequantize, quantize_int8, quantize_nf4

SMALL = TritonMatmulTuning(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=2)
KINDS = {"nf4": (quantize_nf4, nf4_matmul, nf4_matmul_reference),
         "int8": (quantize_int8, int8_matmul, int8_matmul_reference)}


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _case(m: int, k: int, n: int, kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    w = KINDS[kind][0](rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16")
    return x, jax.tree_util.tree_map(jnp.asarray, w)


def _grad_check(op, ref, x: jax.Array, n: int) -> None:
    ct = jnp.asarray(np.random.default_rng(1).standard_normal((x.shape[0], n)), jnp.float32)

    def loss(f):
        return lambda x: (f(x).astype(jnp.float32) * ct).sum()

    g = jax.grad(loss(op))(x)
    g_ref = jax.grad(loss(ref))(x)
    assert g.shape == x.shape and g.dtype == x.dtype
    assert _rel(g, g_ref) <= 1e-2


# (M, K, N): K not a multiple of block_k (320 = 5 x 64), N not a multiple of block_n (72, 40),
# M not a multiple of the tile (5, 33); M = 1 takes the CUDA-core variant of the NF4 forward.
# int8 also at M = 80 (its forward takes any M).
@pytest.mark.parametrize("kind,m,k,n", [("nf4", 5, 320, 72), ("nf4", 33, 256, 40),
                                        ("nf4", 1, 128, 64), ("int8", 5, 320, 72),
                                        ("int8", 1, 128, 64), ("int8", 80, 192, 48)])
def test_forward_and_grad_match_reference(kind: str, m: int, k: int, n: int) -> None:
    _, op, ref = KINDS[kind]
    x, w = _case(m, k, n, kind, seed=m + k + n)
    kw = dict(dx_tuning=SMALL) if kind == "nf4" else {}
    y = op(x, w, tuning=SMALL, interpret=True, **kw)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, ref(x, w)) <= 1e-2
    _grad_check(lambda x: op(x, w, tuning=SMALL, interpret=True, **kw), lambda x: ref(x, w), x, n)


@pytest.mark.parametrize("m,splits", [(1, 1), (1, 4), (3, 2)])
def test_nf4_split_k(m: int, splits: int) -> None:
    x, w = _case(m, 512, 40, "nf4", seed=splits + m)
    t = TritonMatmulTuning(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=2,
                           splits=splits)
    assert _rel(nf4_matmul(x, w, tuning=t, interpret=True), nf4_matmul_reference(x, w)) <= 1e-2


def test_nf4_dx_kernel_at_more_rows() -> None:
    """The dx kernel alone (any M; ops.linear runs it behind a fused forward of M <= 64)."""
    rng = np.random.default_rng(7)
    _, w = _case(1, 192, 48, "nf4", seed=7)
    dy = jnp.asarray(rng.standard_normal((80, 48), dtype=np.float32), jnp.bfloat16)
    want = jnp.dot(dy, dequantize(w, jnp.bfloat16), preferred_element_type=jnp.float32)
    assert _rel(nf4_matmul_dx(dy, w, tuning=SMALL, interpret=True), want) <= 1e-2


def test_errors_name_the_value() -> None:
    x, w = _case(4, 96, 32, "nf4")
    with pytest.raises(KernelError, match="K=96 must be a multiple of 64"):
        nf4_matmul(x, w, tuning=SMALL, interpret=True)
    with pytest.raises(KernelError, match="block_k=32"):
        TritonMatmulTuning(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    with pytest.raises(KernelError, match=r"x.shape=\(4, 64\)"):
        nf4_matmul(x[:, :64], w, interpret=True)
    x, w = _case(65, 128, 32, "nf4")
    with pytest.raises(KernelError, match="M=65"):
        nf4_matmul(x, w, interpret=True)


def test_tunings_come_from_the_defaults_table() -> None:
    assert TritonMatmulTuning.for_nf4(1) == TritonMatmulTuning(*defaults.NF4_TRITON_FORWARD[1])
    assert TritonMatmulTuning.for_nf4(17).block_n == defaults.NF4_TRITON_FORWARD[64][1]
    assert TritonMatmulTuning.for_int8(64).block_m == 16
    assert TritonMatmulTuning.for_int8(65).block_m == 128


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("m", [6, 80])
def test_linear_every_impl(kind: str, m: int) -> None:
    """Every implementation of ops.linear against the reference: the fused kernels (M <= 64), the
    dequantization kernel (NF4, M > 64), XLA; on the CPU the Pallas ones run interpreted."""
    x, w = _case(m, 192, 48, kind, seed=3)
    x3 = x.reshape(2, m // 2, 192)
    ref = KINDS[kind][2](x, w).reshape(2, m // 2, 48)
    for impl in (None, Impl.XLA, Impl.REFERENCE, "pallas_triton", Impl.PALLAS_MOSAIC):
        y = linear(x3, w, impl=impl)
        assert y.shape == (2, m // 2, 48) and y.dtype == jnp.bfloat16
        assert _rel(y, ref) <= 1e-2, impl
    for impl in (Impl.PALLAS_TRITON, Impl.XLA):  # XLA's: its own backward (re-dequantizes)
        _grad_check(lambda x: linear(x.reshape(2, m // 2, 192), w, impl=impl).reshape(m, 48),
                    lambda x: KINDS[kind][2](x, w), x, 48)
    bias = jnp.arange(48, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(linear(x3, w, bias, impl="xla"), np.float32),
                               np.asarray((ref.astype(jnp.float32) + bias).astype(jnp.bfloat16),
                                          np.float32), rtol=1e-2, atol=1e-2)
    with pytest.raises(KernelError, match="impl=cudnn is an attention implementation"):
        linear(x3, w, impl=Impl.CUDNN)


def test_linear_falls_back_for_shapes_no_kernel_takes() -> None:
    x, w = _case(3, 96, 16, "nf4", seed=4)  # K % 64 != 0, float32 x: dequantize-then-dot
    y = linear(x.astype(jnp.float32), w, impl=Impl.PALLAS_TRITON)
    assert _rel(y, nf4_matmul_reference(x.astype(jnp.float32), w)) <= 1e-2


@pytest.mark.parametrize("impl", [None, Impl.PALLAS_TRITON])
def test_linear_grad_inside_scan_over_stacked_layers(impl) -> None:
    rng = np.random.default_rng(12)
    stacked = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(
        rng.standard_normal((2, 64, 64), dtype=np.float32) * 0.05, dtype="bfloat16"))
    x = jnp.asarray(rng.standard_normal((3, 64), dtype=np.float32), jnp.bfloat16)

    def run(f):
        def loss(x):
            y, _ = jax.lax.scan(lambda h, w: (f(h, w), None), x, stacked)
            return y.astype(jnp.float32).sum(), y
        return jax.value_and_grad(loss, has_aux=True)(x)

    (v, y), g = run(lambda h, w: linear(h, w, impl=impl))
    (v_ref, y_ref), g_ref = run(lambda h, w: nf4_matmul_reference(h, w))
    assert _rel(y, y_ref) <= 1e-2
    # The sum cancels: bound its error by the outputs' magnitude, not by |sum| itself (bf16
    # weights round NF4 * absmax once in the reference and up to three times in the kernels).
    assert abs(float(v) - float(v_ref)) <= 1e-2 * float(jnp.abs(y_ref.astype(jnp.float32)).sum())
    assert _rel(g, g_ref) <= 1e-2


def test_default_linear_rule_follows_the_measurements() -> None:
    nf4, i8, bf16 = QuantKind.NF4, QuantKind.INT8, jnp.bfloat16

    def rule(kind, m, k=4096, dtype=bf16, hopper=True, gpu=True, blocksize=64):
        return defaults.linear_impl(kind, blocksize, m, k, dtype, gpu=gpu, hopper=hopper)

    assert rule(nf4, 16) is Impl.PALLAS_MOSAIC and rule(nf4, 17) is Impl.PALLAS_TRITON
    assert rule(nf4, 1, hopper=False) is Impl.PALLAS_TRITON
    assert rule(nf4, 1, dtype=jnp.float16) is Impl.PALLAS_TRITON
    assert rule(nf4, 64) is Impl.PALLAS_TRITON                      # the fused kernels
    assert rule(nf4, 2048) is Impl.PALLAS_TRITON                    # the dequantization kernel
    assert rule(nf4, 2049) is Impl.XLA and rule(nf4, 128, dtype=jnp.float32) is Impl.XLA
    assert rule(nf4, 1, k=96) is Impl.PALLAS_TRITON                 # dequantization kernel
    assert rule(nf4, 1, k=96, dtype=jnp.float32) is Impl.XLA
    assert rule(nf4, 1, blocksize=128, dtype=jnp.float32) is Impl.XLA
    assert rule(i8, 64) is Impl.PALLAS_TRITON and rule(i8, 65) is Impl.XLA
    assert rule(i8, 1, k=8) is Impl.XLA
    assert rule(nf4, 1, gpu=False, hopper=False) is Impl.XLA
