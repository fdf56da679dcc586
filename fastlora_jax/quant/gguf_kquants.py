"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) in JAX: quantize and dequantize, vectorised over blocks.

The `gguf` package writes the legacy types (Q4_0 ... Q8_0) but only reads the K-quants, so these are
ours. Each follows the arithmetic of ggml's reference quantizer (`quantize_row_q{4,5,6}_K_ref`,
the path `llama-quantize` takes without an importance matrix) step by step in float32, so a
tensor quantizes to the bytes llama.cpp writes for it except where float rounding (our sums run
in another order than the C loops) decides a near-tie between two candidate scales: about 2%
of Q4_K blocks, 0.3% of Q5_K, none of Q6_K in our tests, at equal total error.

- Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32, `x ~ d*sc*q - dmin*m` with 6-bit sc, m
  per sub-block and fp16 d, dmin per super-block. Each sub-block's (scale, min) comes from a
  weighted least-squares search over candidate scales (`_fit_scale_min`, ggml's
  make_qkx2_quants), weights `sqrt(mean(x^2)) + |x|`.
- Q6_K: 16 sub-blocks of 16, `x ~ d*sc*(q - 32)` with int8 sc, searching 19 candidate scales
  weighted by x^2 (`_fit_symmetric`, ggml's make_qx_quants).

Layouts (bytes per 256 weights): Q4_K 144 = d, dmin, scales[12], qs[128]; Q5_K 176 = d, dmin,
scales[12], qh[32], qs[128]; Q6_K 210 = ql[128], qh[64], scales[16], d. Sub-blocks are
processed as columns [elements, sub-blocks] so every step is a contiguous vector operation.

Entry points take float32 [n_blocks, 256] and return uint8 [n_blocks, bytes]; jit-compiled, they
run on whatever device holds the input (the GPU when there is one). `gguf_rows.quantize_rows`
feeds them a whole tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS
f32 = jnp.float32


def _sum(a: jax.Array) -> jax.Array:
    """Sum over a sub-block, [elements, sub-blocks] -> [sub-blocks], left to right."""
    return jax.lax.fori_loop(1, a.shape[0], lambda i, acc: acc + a[i], a[0])


def _rint(a: jax.Array) -> jax.Array:
    """ggml's nearest_int: round half to even."""
    return jnp.round(a)


def _to_f16(a: jax.Array) -> jax.Array:
    return a.astype(jnp.float16)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K

def _fit_scale_min(x: jax.Array, w: jax.Array, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per sub-block (scale, -min, levels) with x ~ scale*L + min, L in [0, nmax].

    x, w: [32, m] (element, sub-block). Starts from the min-max fit, then tries `nstep + 1`
    scales (nmax + rmin + rdelta*i) / (max - min) with the least-squares (scale, min) for each
    rounding, keeping the one with the smallest weighted squared error; min is clamped to <= 0.
    """
    mn = jnp.minimum(jnp.min(x, axis=0), f32(0))
    mx = jnp.max(x, axis=0)
    flat = mx == mn
    sum_w = _sum(w)
    sum_x = _sum(w * x)
    span = jnp.where(flat, f32(1), mx - mn)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    levels = jnp.clip(_rint(iscale * (x - mn)), 0, nmax)
    diff = scale * levels + mn - x
    best = _sum(w * (diff * diff))

    def step(i, carry):
        levels, best, scale, mn = carry
        iscale = (f32(rmin) + f32(rdelta) * i.astype(f32) + f32(nmax)) / jnp.where(
            flat, f32(1), mx - mn)
        cand = jnp.clip(_rint(iscale * (x - mn)), 0, nmax)
        wl = w * cand
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * cand), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = jnp.where(det > 0, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_min = jnp.where(positive, f32(0), this_min)
        this_scale = jnp.where(positive, sum_xl / jnp.where(sum_l2 > 0, sum_l2, f32(1)),
                               this_scale)
        diff = this_scale * cand + this_min - x
        err = _sum(w * (diff * diff))
        take = (det > 0) & (err < best) & ~flat
        return (jnp.where(take, cand, levels), jnp.where(take, err, best),
                jnp.where(take, this_scale, scale), jnp.where(take, this_min, mn))

    levels, _, scale, mn = jax.lax.fori_loop(0, nstep + 1, step, (levels, best, scale, mn))
    scale = jnp.where(flat, f32(0), scale)
    levels = jnp.where(flat, f32(0), levels)
    return scale, -mn, levels


def _pack_scales(ls: jax.Array, lm: jax.Array) -> jax.Array:
    """6-bit scales and mins [n, 8] -> the 12 scale bytes of Q4_K / Q5_K [n, 12]."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return jnp.concatenate([lo, mid, hi], axis=1)


def _f16_bytes(h: jax.Array) -> jax.Array:
    """float16 [n] -> little-endian bytes [n, 2]."""
    bits = jax.lax.bitcast_convert_type(h, jnp.uint16)
    return jnp.stack([bits & 0xFF, bits >> 8], axis=1).astype(jnp.uint8)


def _affine_k(xt: jax.Array, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K / Q5_K core on sub-block columns xt [32, n*8]: (d16, dmin16, ls, lm,
    levels [n, 256] in [0, nmax])."""
    m = xt.shape[1]
    n = m // 8
    av_x = jnp.sqrt(_sum(xt * xt) / f32(32))
    w = av_x + jnp.abs(xt)
    scales, mins, levels = _fit_scale_min(xt, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = jnp.maximum(jnp.max(scales, axis=1), f32(0))
    max_min = jnp.maximum(jnp.max(mins, axis=1), f32(0))
    inv_scale = jnp.where(max_scale > 0, f32(63) / jnp.where(max_scale > 0, max_scale, 1), 0)
    inv_min = jnp.where(max_min > 0, f32(63) / jnp.where(max_min > 0, max_min, 1), 0)
    ls = jnp.minimum(_rint(inv_scale[:, None] * scales), 63).astype(jnp.uint8)
    lm = jnp.minimum(_rint(inv_min[:, None] * mins), 63).astype(jnp.uint8)
    d16 = _to_f16(max_scale / f32(63))
    dmin16 = _to_f16(max_min / f32(63))
    d = (d16.astype(f32)[:, None] * ls.astype(f32)).reshape(m)
    dm = (dmin16.astype(f32)[:, None] * lm.astype(f32)).reshape(m)
    requant = jnp.clip(_rint((xt + dm) / jnp.where(d != 0, d, f32(1))), 0, nmax)
    levels = jnp.where(d != 0, requant, levels)
    return d16, dmin16, ls, lm, levels.T.reshape(n, QK_K).astype(jnp.uint8)


def _columns(x: jax.Array | np.ndarray, size: int) -> jax.Array | np.ndarray:
    """float32 [n, 256] -> sub-block columns [size, n*256/size], materialised outside the jitted
    quantizers so that every sub-block element row is contiguous (a transpose inside the jit
    may become a strided layout, several times slower on the CPU). A host array is transposed on
    the host (no device op)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1, size).T)
    x = jnp.asarray(x, f32)
    return jnp.transpose(x.reshape(-1, size))


def quantize_q4_k(x: jax.Array | np.ndarray) -> jax.Array:
    """float32 [n, 256] -> Q4_K blocks uint8 [n, 144]."""
    return _q4_k(_columns(x, 32))


@jax.jit
def _q4_k(xt: jax.Array) -> jax.Array:
    d16, dmin16, ls, lm, q = _affine_k(xt, 15, -1.0, 0.1, 20)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return jnp.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), _pack_scales(ls, lm), qs],
                           axis=1)


def quantize_q5_k(x: jax.Array | np.ndarray) -> jax.Array:
    """float32 [n, 256] -> Q5_K blocks uint8 [n, 176]."""
    return _q5_k(_columns(x, 32))


@jax.jit
def _q5_k(xt: jax.Array) -> jax.Array:
    d16, dmin16, ls, lm, q = _affine_k(xt, 31, -0.5, 0.1, 15)
    q = q.reshape(-1, 4, 2, 32)  # [n, chunk, half, j]
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = (q >> 4).astype(jnp.uint8)  # bit 2c of qh[j]: first half of chunk c; 2c+1: second
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8))[None, :, None, None] + jnp.arange(
        2, dtype=jnp.uint8)[None, None, :, None]
    qh = jnp.sum((high << shifts).astype(jnp.uint32), axis=(1, 2)).astype(jnp.uint8)
    return jnp.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), _pack_scales(ls, lm), qh, qs],
                           axis=1)


# ---------------------------------------------------------------------------------------------
# Q6_K

def _fit_symmetric(x: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """Per sub-block (scale, levels) with x ~ scale * (L - nmax), L in [0, 2 nmax - 1].

    x: [16, m] (element, sub-block). The scale -max/nmax (max = the signed value of largest
    magnitude, the first one on ties) and 18 nearby ones are tried; for each rounding the
    least-squares scale (weights x^2) is kept if it lowers the weighted error.
    """
    ax = jnp.abs(x)
    idx = jnp.argmax(ax, axis=0)
    amax = jnp.max(ax, axis=0)
    mx = jnp.take_along_axis(x, idx[None], axis=0)[0]
    zero = amax < _EPS
    mx = jnp.where(zero, f32(1), mx)
    w = x * x

    def fit(iscale):
        lv = jnp.clip(_rint(iscale * x), -nmax, nmax - 1)
        return lv, _sum(w * x * lv), _sum(w * lv * lv)

    lv, sumlx, suml2 = fit(f32(-nmax) / mx)
    scale = jnp.where(suml2 != 0, sumlx / jnp.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    levels = lv + nmax
    tries = jnp.asarray([i for i in range(-9, 10) if i != 0], jnp.int32)

    def step(k, carry):
        levels, scale, best = carry
        iscale = -(f32(nmax) + f32(0.1) * tries[k].astype(f32)) / mx
        lv, sumlx, suml2 = fit(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / jnp.where(suml2 > 0, suml2, f32(1))
        scale = jnp.where(take, new_scale, scale)
        return (jnp.where(take, lv + nmax, levels), scale, jnp.where(take, scale * sumlx, best))

    levels, scale, _ = jax.lax.fori_loop(0, tries.shape[0], step, (levels, scale, best))
    return jnp.where(zero, f32(0), scale), jnp.where(zero, f32(0), levels)


def quantize_q6_k(x: jax.Array | np.ndarray) -> jax.Array:
    """float32 [n, 256] -> Q6_K blocks uint8 [n, 210]."""
    return _q6_k(_columns(x, 16))


@jax.jit
def _q6_k(xt: jax.Array) -> jax.Array:
    m = xt.shape[1]
    n = m // 16
    scales, levels = _fit_symmetric(xt, 32)                       # [m], [16, m]
    scales = scales.reshape(n, 16)
    idx = jnp.argmax(jnp.abs(scales), axis=1)
    max_scale = jnp.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = jnp.abs(max_scale) < _EPS
    iscale = f32(-128) / jnp.where(zero, f32(1), max_scale)
    d16 = _to_f16(f32(1) / iscale)
    sc = jnp.minimum(_rint(iscale[:, None] * scales), 127).astype(jnp.int8)
    d = (d16.astype(f32)[:, None] * sc.astype(f32)).reshape(m)
    requant = jnp.clip(_rint(xt / jnp.where(d != 0, d, f32(1))), -32, 31) + 32
    levels = jnp.where(d != 0, requant, levels).T.reshape(n, 2, 4, 32)
    levels = levels.astype(jnp.uint8)  # [n, half of 128, quarter of 32, l]
    lo = levels & 0xF
    ql = jnp.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                         axis=2).reshape(n, 128)
    hi = (levels >> 4).astype(jnp.uint32) << (2 * jnp.arange(4, dtype=jnp.uint32))[None, None,
                                                                                  :, None]
    qh = jnp.sum(hi, axis=2).astype(jnp.uint8).reshape(n, 64)
    out = jnp.concatenate([ql, qh, jax.lax.bitcast_convert_type(sc, jnp.uint8),
                           _f16_bytes(d16)], axis=1)
    return jnp.where(zero[:, None], jnp.uint8(0), out)


# ---------------------------------------------------------------------------------------------
# Dequantization (the inverse layouts; the same float32 operations as the gguf package's)

def _f16_from(b: jax.Array) -> jax.Array:
    bits = b[:, 0].astype(jnp.uint16) | (b[:, 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(f32)


def _unpack_scales(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    lo, mid, hi = s[:, :4], s[:, 4:8], s[:, 8:]
    sc = jnp.concatenate([lo & 0x3F, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    m = jnp.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(f32), m.astype(f32)


@jax.jit
def dequantize_q4_k(blocks: jax.Array) -> jax.Array:
    """Q4_K uint8 [n, 144] -> float32 [n, 256]."""
    n = blocks.shape[0]
    sc, m = _unpack_scales(blocks[:, 4:16])
    d = _f16_from(blocks[:, 0:2])[:, None] * sc
    dm = _f16_from(blocks[:, 2:4])[:, None] * m
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> jnp.asarray([0, 4], jnp.uint8)[None, None, :, None]
    q = (qs & 0xF).reshape(n, 8, 32).astype(f32)
    return (d[..., None] * q - dm[..., None]).reshape(n, QK_K)


@jax.jit
def dequantize_q5_k(blocks: jax.Array) -> jax.Array:
    """Q5_K uint8 [n, 176] -> float32 [n, 256]."""
    n = blocks.shape[0]
    sc, m = _unpack_scales(blocks[:, 4:16])
    d = _f16_from(blocks[:, 0:2])[:, None] * sc
    dm = _f16_from(blocks[:, 2:4])[:, None] * m
    qh = blocks[:, 16:48].reshape(n, 1, 32) >> jnp.arange(8, dtype=jnp.uint8)[None, :, None]
    ql = blocks[:, 48:].reshape(n, 4, 1, 32) >> jnp.asarray([0, 4], jnp.uint8)[None, None, :, None]
    q = ((ql & 0xF).reshape(n, 8, 32) | ((qh & 1) << 4)).astype(f32)
    return (d[..., None] * q - dm[..., None]).reshape(n, QK_K)


@jax.jit
def dequantize_q6_k(blocks: jax.Array) -> jax.Array:
    """Q6_K uint8 [n, 210] -> float32 [n, 256]."""
    n = blocks.shape[0]
    sc = jax.lax.bitcast_convert_type(blocks[:, 192:208], jnp.int8).astype(f32)
    d = (_f16_from(blocks[:, 208:210])[:, None] * sc).reshape(n, 16, 1)
    ql = blocks[:, :128].reshape(n, 2, 1, 64) >> jnp.asarray([0, 4], jnp.uint8)[None, None, :, None]
    ql = (ql & 0xF).reshape(n, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> (2 * jnp.arange(4, dtype=jnp.uint8))[
        None, None, :, None]
    q = (ql | ((qh & 3) << 4)).astype(jnp.int8) - jnp.int8(32)
    return (d * q.reshape(n, 16, 16).astype(f32)).reshape(n, QK_K)


QUANTIZE = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
DEQUANTIZE = {"Q4_K": dequantize_q4_k, "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k}


__all__ = ["BLOCK_BYTES", "DEQUANTIZE", "QK_K", "QUANTIZE", "dequantize_q4_k", "dequantize_q5_k",
           "dequantize_q6_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]
