"""Fused NF4 / int8 matmul kernels vs their references, interpreted on CPU (odd shapes included)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from fastlora_jax.kernels.nf4_matmul import MatmulTuning, nf4_matmul, nf4_matmul_reference
from fastlora_jax.ops import Impl, linear
from fastlora_jax.quant import quantize_int8, quantize_nf4

SMALL = MatmulTuning(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=2)
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


# (M, K, N): K not a multiple of block_k (320 = 5 x 64), N not a multiple of block_n (72, 40),
# M not a multiple of block_m (5, 33, 80); M = 1 and M <= 64 take the NF4 decode variants, M = 80
# the tiled kernel.
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("m,k,n", [(5, 320, 72), (33, 256, 40), (1, 128, 64), (80, 192, 48)])
def test_forward_and_grad_match_reference(kind: str, m: int, k: int, n: int) -> None:
    _, op, ref = KINDS[kind]
    x, w = _case(m, k, n, kind, seed=m + k + n)
    y = op(x, w, tuning=SMALL, bwd_tuning=SMALL, interpret=True)
    y_ref = ref(x, w)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, y_ref) <= 1e-2

    ct = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)), jnp.float32)
    def loss(f):
        return lambda x: (f(x).astype(jnp.float32) * ct).sum()
    g = jax.grad(loss(lambda x: op(x, w, tuning=SMALL, bwd_tuning=SMALL, interpret=True)))(x)
    g_ref = jax.grad(loss(lambda x: ref(x, w)))(x)
    assert g.shape == x.shape and g.dtype == x.dtype
    assert _rel(g, g_ref) <= 1e-2


@pytest.mark.parametrize("m", [1, 80])
def test_backward_through_xla_option(m: int) -> None:
    x, w = _case(m, 128, 32, "nf4", seed=9)
    g = jax.grad(lambda x: nf4_matmul(x, w, bwd_xla=True, interpret=True).astype(jnp.float32).sum())(x)
    g_ref = jax.grad(lambda x: nf4_matmul_reference(x, w).astype(jnp.float32).sum())(x)
    assert _rel(g, g_ref) <= 1e-2


def test_nf4_rejects_k_not_multiple_of_64() -> None:
    x, w = _case(4, 96, 32, "nf4")
    with pytest.raises(KernelError, match="K=96 must be a multiple of 64"):
        nf4_matmul(x, w, tuning=SMALL, interpret=True)
    with pytest.raises(KernelError, match="block_k=32"):
        MatmulTuning(block_k=32)
    with pytest.raises(KernelError, match=r"x.shape=\(4, 64\)"):
        nf4_matmul(x[:, :64], w, interpret=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_linear_dispatch(kind: str) -> None:
    x, w = _case(6, 192, 48, kind, seed=3)
    x3 = x.reshape(2, 3, 192)
    ref = KINDS[kind][2](x, w).reshape(2, 3, 48)
    for impl in (None, Impl.XLA, Impl.REFERENCE, Impl.PALLAS):
        y = linear(x3, w, impl=impl)
        assert y.shape == (2, 3, 48) and y.dtype == jnp.bfloat16
        assert _rel(y, ref) <= 1e-2, impl
    bias = jnp.arange(48, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(linear(x3, w, bias, impl="xla"), np.float32),
                               np.asarray((ref.astype(jnp.float32) + bias).astype(jnp.bfloat16),
                                          np.float32), rtol=1e-2, atol=1e-2)


def test_linear_pallas_falls_back_for_odd_k() -> None:
    x, w = _case(3, 96, 16, "nf4", seed=4)  # K % 64 != 0: dequantize-then-dot
    y = linear(x, w, impl=Impl.PALLAS)
    assert _rel(y, nf4_matmul_reference(x, w)) <= 1e-2


@pytest.mark.parametrize("impl", [None, Impl.PALLAS])
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


def test_default_dispatch_rule_follows_the_measurements() -> None:
    from fastlora_jax.ops.linear import pallas_bwd_is_default, pallas_is_default
    _, w = _case(4, 128, 32, "nf4")
    _, w8 = _case(4, 128, 32, "int8")
    assert pallas_is_default(64, w) and not pallas_is_default(65, w)
    assert pallas_bwd_is_default(64, w) and not pallas_bwd_is_default(65, w)
    assert not pallas_bwd_is_default(1, w8)


def test_mgpu_default_only_for_small_bf16_nf4_on_hopper() -> None:
    from fastlora_jax.ops.linear import mgpu_tuning_for
    _, w = _case(4, 128, 32, "nf4")
    _, w8 = _case(4, 128, 32, "int8")
    t = mgpu_tuning_for(1, w, jnp.bfloat16, "NVIDIA H200")
    assert t is not None and t.tile_m == 8 and t.max_concurrent_steps == 4
    assert t.blocks_per_step == 2 and t.acc_scale                  # K = 128: two 64-weight blocks
    _, w4 = _case(4, 512, 32, "nf4")                               # K/64 = 8: four per step
    assert mgpu_tuning_for(16, w4, jnp.bfloat16, "NVIDIA H200").blocks_per_step == 4
    _, w_odd = _case(4, 192, 32, "nf4")                            # K/64 = 3 is odd: one block
    assert mgpu_tuning_for(1, w_odd, jnp.bfloat16, "NVIDIA H200").blocks_per_step == 1
    assert mgpu_tuning_for(16, w, jnp.bfloat16, "NVIDIA H100 80GB HBM3").tile_m == 16
    assert mgpu_tuning_for(17, w, jnp.bfloat16, "NVIDIA H200") is None
    assert mgpu_tuning_for(1, w, jnp.float32, "NVIDIA H200") is None
    assert mgpu_tuning_for(1, w, jnp.bfloat16, "NVIDIA A100-SXM4-80GB") is None
    assert mgpu_tuning_for(1, w8, jnp.bfloat16, "NVIDIA H200") is None
