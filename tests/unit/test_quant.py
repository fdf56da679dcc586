"""QTensor, NF4 / int8 quantization and bnb I/O, on CPU without the reference environment."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fastlora_jax.errors import CheckpointError, ConfigError, KernelError
from fastlora_jax.quant import (DYNAMIC_MAP, NF4_MAP, QTensor, QuantKind, dequantize,
                                from_bnb_4bit, nf4_block_scales, from_bnb_int8, quantize,
                                quantize_int8, quantize_nf4, stack, to_bnb_4bit)
from fastlora_jax.quant.nf4 import _double_quantize, _torch_mean


def _w(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.05


@pytest.mark.parametrize("shape", [(64, 128), (37, 51), (300, 1000), (3, 5)])
def test_nf4_shapes_and_error_bound(shape: tuple[int, int]) -> None:
    w = _w(shape)
    q = quantize_nf4(w)
    n = shape[0] * shape[1]
    nb = -(-n // 64)
    assert q.codes.shape == ((n + 1) // 2,) and q.codes.dtype == np.uint8
    assert q.absmax.shape == (nb,) and q.absmax.dtype == np.uint8
    assert q.nested_absmax.shape == (-(-nb // 256),) and q.nested_offset.shape == ()
    deq = np.asarray(dequantize(q))
    assert deq.shape == shape and deq.dtype == np.float32
    # Per block: |w - deq| <= half the widest NF4 gap times the block absmax (plus the 8-bit error).
    pad = (-n) % 64
    wb = np.pad(w.reshape(-1), (0, pad)).reshape(-1, 64)
    err = np.abs(np.pad((deq - w).reshape(-1), (0, pad)).reshape(-1, 64))
    gap = np.max(np.diff(NF4_MAP)) / 2
    assert np.all(err <= np.abs(wb).max(axis=1, keepdims=True) * (gap + 0.02))


def test_nf4_exact_values_round_trip() -> None:
    # Weights that are exactly NF4 values times a power-of-two absmax come back unchanged
    # up to the 8-bit absmax quantization, which is exact for equal absmax values.
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, size=(8, 128))
    codes[:, 0] = 15  # every block holds +1.0 -> absmax exactly 0.5
    w = (NF4_MAP[codes] * 0.5).astype(np.float32)
    w[:, 64] = 0.5
    q = quantize_nf4(w)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), w)


def test_packing_high_nibble_first() -> None:
    w = np.zeros((1, 64), np.float32)
    w[0, 0], w[0, 1] = 1.0, -1.0  # codes 15 and 0
    q = quantize_nf4(w)
    assert q.codes[0] == 0xF0
    assert q.codes[1] == 0x77  # zeros are code 7


def test_double_quantization_within_one_entry() -> None:
    # bitsandbytes' grid lookup (reproduced here; bit-exactness is in tests/parity) is the exact
    # nearest dynamic-map entry or its neighbour, and is exact away from the midpoints.
    rng = np.random.default_rng(7)
    absmax = np.abs(rng.standard_normal(1000).astype(np.float32)) * 0.05
    absmax[512:768] = 0.025  # an all-zero block of absmax - offset: code 0
    codes, nested = _double_quantize(absmax, np.float32(0.025))
    blocks = np.pad(absmax - np.float32(0.025), (0, 24)).reshape(-1, 256)
    np.testing.assert_array_equal(nested, np.abs(blocks).max(axis=1))
    assert np.all(codes[512:768] == 0)
    normed = (blocks * (np.float32(1) / np.maximum(nested, 1e-30)[:, None])).reshape(-1)[:1000]
    keep = np.r_[0:512, 768:1000]
    dist = np.abs(normed[keep, None] - DYNAMIC_MAP[None, :])
    best = np.argmin(dist, axis=1)
    assert np.abs(codes[keep].astype(int) - best).max() <= 1
    mid = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2
    far = np.abs(normed[keep, None] - mid[None, :]).min(axis=1) > 2 / 65535
    np.testing.assert_array_equal(codes[keep][far], best[far])
    assert codes.min() == 0 or codes.max() == 255  # each block's extreme maps to +-1


@pytest.mark.parametrize("n", [1, 3, 5, 8, 100, 40000, 300001])
def test_torch_mean_close_to_exact(n: int) -> None:
    # torch's float32 cascade sum (reproduced bit for bit in tests/parity) is within a few ulp of
    # the correctly rounded mean, whatever the thread split.
    x = np.abs(np.random.default_rng(n).standard_normal(n)).astype(np.float32) * 0.03
    exact = np.float32(x.mean(dtype=np.float64))
    for threads in (1, 2, 8):
        np.testing.assert_array_max_ulp(_torch_mean(x, threads), exact, 4)
    if n <= 4:  # fewer than 8 values: one running sum
        np.testing.assert_equal(_torch_mean(x), np.float32(np.cumsum(x, dtype=np.float32)[-1] / n))


def test_nf4_dtype_and_bf16_input() -> None:
    w = _w((32, 64)).astype(ml_dtypes.bfloat16)
    q = quantize_nf4(w)
    assert q.dtype == "bfloat16" and dequantize(q).dtype == jnp.bfloat16
    assert quantize_nf4(w, dtype="float32").dtype == "float32"
    with pytest.raises(KernelError, match="dtype='int32'"):
        quantize_nf4(w, dtype="int32")
    with pytest.raises(KernelError, match="ndim >= 2"):
        quantize_nf4(np.zeros(64, np.float32))


def test_leading_dims_stack_and_scan() -> None:
    w = _w((3, 40, 72), seed=1)
    q = quantize_nf4(w)
    assert q.lead == (3,) and q.codes.shape == (3, 40 * 72 // 2)
    assert q.nested_offset.shape == (3,)
    per = [quantize_nf4(w[i]) for i in range(3)]
    s = stack(per)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(s)):
        np.testing.assert_array_equal(a, b)
    full = np.asarray(dequantize(q))
    assert full.shape == (3, 40, 72)
    np.testing.assert_array_equal(full[1], np.asarray(dequantize(q[1])))

    def body(carry, layer_q):
        return carry + dequantize(layer_q).sum(), None
    qj = jax.tree_util.tree_map(jnp.asarray, q)
    total, _ = jax.lax.scan(body, jnp.float32(0), qj)
    np.testing.assert_allclose(total, full.sum(), rtol=1e-5)


def test_pytree_none_fields_and_jit() -> None:
    q = quantize_int8(_w((16, 32)))
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 2  # codes and scale; the NF4 fields are None
    out = jax.jit(dequantize)(q)
    assert out.shape == (16, 32)


def test_stack_rejects_mismatched() -> None:
    with pytest.raises(KernelError, match="shape="):
        stack([quantize_nf4(_w((8, 64))), quantize_nf4(_w((16, 64)))])
    with pytest.raises(KernelError, match="empty"):
        stack([])


def test_int8_round_half_even_and_bound() -> None:
    w = _w((24, 40), seed=5)
    w[3] = 0.0
    q = quantize_int8(w)
    assert q.kind is QuantKind.INT8 and q.codes.dtype == np.int8 and q.scale.shape == (24,)
    np.testing.assert_array_equal(np.abs(q.codes).max(axis=1)[[0, 1, 2]], 127)
    assert np.all(q.codes[3] == 0)
    deq = np.asarray(dequantize(q))
    assert np.all(np.abs(deq - w) <= q.scale[:, None] / 2 * (1 + 1e-6))
    # Exactly half-way values round to even.
    w2 = np.array([[127.0, 0.5, 1.5, 2.5, -0.5]], np.float32)
    np.testing.assert_array_equal(quantize_int8(w2).codes, [[127, 0, 2, 2, 0]])


def test_from_bnb_int8() -> None:
    weight = np.random.default_rng(0).integers(-127, 128, size=(6, 10)).astype(np.int8)
    scb = np.linspace(0.5, 3.0, 6).astype(np.float32)
    q = from_bnb_int8(weight, scb)
    np.testing.assert_allclose(np.asarray(dequantize(q, "float32")),
                               weight * scb[:, None] / 127, rtol=1e-6)
    with pytest.raises(CheckpointError, match="SCB"):
        from_bnb_int8(weight, scb[:3])
    with pytest.raises(CheckpointError, match="int8"):
        from_bnb_int8(weight.astype(np.float32), scb)


def test_bnb_4bit_round_trip_and_errors() -> None:
    q = quantize_nf4(_w((48, 80)).astype(ml_dtypes.bfloat16))
    sd = to_bnb_4bit(q)
    state = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"]))
    assert list(state) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                           "nested_dtype", "nested_offset"]
    assert sd["weight"].shape == (48 * 80 // 2, 1)
    back = from_bnb_4bit(sd)
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)
    assert back.shape == q.shape and back.dtype == q.dtype

    bad = dict(sd)
    del bad["weight.nested_absmax"]
    with pytest.raises(CheckpointError, match="P.weight.nested_absmax: missing"):
        from_bnb_4bit(bad, prefix="P.")
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:-1]})
    with pytest.raises(CheckpointError, match="weight.absmax: expected uint8 with"):
        from_bnb_4bit(bad)
    for field, value in [("quant_type", "fp4"), ("blocksize", 128)]:
        blob = json.dumps(dict(state, **{field: value})).encode()
        bad = dict(sd, **{"weight.quant_state.bitsandbytes__nf4": np.frombuffer(blob, np.uint8)})
        with pytest.raises(CheckpointError, match=f"{field}="):
            from_bnb_4bit(bad)
    fp4 = {k.replace("__nf4", "__fp4"): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="fp4"):
        from_bnb_4bit(fp4)
    with pytest.raises(CheckpointError, match="leading axes"):
        to_bnb_4bit(stack([q, q]))


def test_qtensor_index_without_lead_raises() -> None:
    q = quantize_int8(_w((4, 8)))
    with pytest.raises(KernelError, match="no leading axes"):
        q[0]
    assert isinstance(q, QTensor)


@pytest.mark.parametrize("shape", [(64, 128), (3, 40, 72)])
def test_dequantize_block_aligned_path_matches_general(shape: tuple[int, ...]) -> None:
    q = quantize_nf4(_w(shape, seed=8).astype(ml_dtypes.bfloat16))
    fast = np.asarray(dequantize(q, "float32"))
    # The general (padded) path, element by element.
    n, k = shape[-2:]
    codes = q.codes.reshape(-1, q.codes.shape[-1])
    scales = np.asarray(nf4_block_scales(q)).reshape(codes.shape[0], -1)
    for i in range(codes.shape[0]):
        nib = np.stack([codes[i] >> 4, codes[i] & 0xF], axis=-1).reshape(-1)[: n * k]
        ref = NF4_MAP[nib] * np.repeat(scales[i], 64)[: n * k]
        np.testing.assert_array_equal(fast.reshape(-1, n * k)[i], ref)


def test_quantize_is_keyed_by_quant_kind() -> None:
    w = _w((2, 16, 64), seed=9).astype(ml_dtypes.bfloat16)
    for kind, direct in ((QuantKind.NF4, quantize_nf4), (QuantKind.INT8, quantize_int8)):
        got, want = quantize(w, kind, dtype="float32"), direct(w, dtype="float32")
        assert got.kind is kind and got.dtype == "float32"
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="kind='nf4' is not a QuantKind"):
        quantize(w, "nf4")
