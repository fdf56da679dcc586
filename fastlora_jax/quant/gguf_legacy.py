"""GGUF's legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) quantized in JAX, byte for byte as the
`gguf` package's numpy quantizers (and so ggml's reference ones) write them.

The `gguf` package quantizes these types in numpy sixteen rows at a time; on a 2-core CPU that was
half of a q8_0 export. Here every type is one jitted, fused pass over blocks of 32, run on whatever
device holds the tensor. Each follows the package's float32 arithmetic operation by operation:

- Q8_0: `d = amax / 127`, `q = round_half_away(x / d)` (as `x * (1/d)`), int8; 34 bytes = d, qs.
- Q4_0 / Q5_0: `d = max / -8` (`-16`), max the signed value of largest magnitude (first on ties),
  `q = trunc(x * (1/d) + 8.5)` (`16.5`) clipped to 15 (31); Q4_0 18 bytes = d, qs; Q5_0 22 bytes =
  d, qh (bit 4 of every q, little-endian bit order), qs.
- Q4_1 / Q5_1: `d = (max - min) / 15` (`31`), `q = trunc((x - min) * (1/d) + 0.5)`; Q4_1 20 bytes
  = d, min, qs; Q5_1 24 bytes = d, min, qh, qs.

qs packs element j of a block in the low nibble and element j + 16 in the high nibble of byte j.
XLA's rewrites that would round differently from numpy (a division by a constant turned into a
multiplication, `x * (1/d)` folded into `x / d`) are kept out (`_divide`, `_inverse`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
f32 = jnp.float32


def _divide(a: jax.Array, divisor: float) -> jax.Array:
    """`a / divisor` rounded as a true float32 division. XLA turns a division by a broadcast
    scalar into a multiplication by its reciprocal, which rounds differently from numpy's
    division; a divisor computed per element (always `divisor`: a is never NaN here, and a NaN
    quotient stays NaN) keeps it a division."""
    return a / jnp.where(jnp.isnan(a), f32(1), f32(divisor))


def _inverse(d: jax.Array) -> jax.Array:
    """1/d, 0 where d is 0 (the package's `np.where(d == 0, 0, 1 / d)`), kept a separate value:
    XLA would otherwise fold `x * (1/d)` into `x / d`, which rounds differently."""
    return jax.lax.optimization_barrier(
        jnp.where(d == 0, f32(0), f32(1) / jnp.where(d == 0, f32(1), d)))


def _f16_bytes(d: jax.Array) -> jax.Array:
    """float32 [n] -> its float16's little-endian bytes [n, 2]."""
    return jax.lax.bitcast_convert_type(d.astype(jnp.float16), jnp.uint8)


def _signed_max(blocks: jax.Array) -> jax.Array:
    """Per block the value of largest magnitude, sign kept, the first one on ties [n] (numpy's
    argmax; written as reductions, which XLA:CPU runs several times faster than an argmax and
    a gather)."""
    mag = jnp.abs(blocks)
    iota = jnp.arange(BLOCK, dtype=jnp.int32)
    first = jnp.min(jnp.where(mag == jnp.max(mag, axis=1, keepdims=True), iota, BLOCK), axis=1)
    return jnp.max(jnp.where(iota == first[:, None], blocks, -jnp.inf), axis=1)


def _rounded(a: jax.Array) -> jax.Array:
    """`a` as a stored float32: the next addition may not fuse with the product that made it
    (XLA contracts `x * y + c` into one FMA, which skips the rounding numpy does between)."""
    return jax.lax.optimization_barrier(a)


def _nibbles(q: jax.Array) -> jax.Array:
    """Levels [n, 32] -> qs [n, 16]: low nibble element j, high nibble element j + 16."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _high_bits(q: jax.Array) -> jax.Array:
    """Bit 4 of each of the 32 levels as 4 bytes, element 8k + j in bit j of byte k."""
    bits = (q >> 4).reshape(-1, 4, 8).astype(jnp.uint32) << jnp.arange(8, dtype=jnp.uint32)
    return jnp.sum(bits, axis=2).astype(jnp.uint8)


def _levels(scaled: jax.Array, nmax: int) -> jax.Array:
    """trunc(scaled) -> uint8 clipped to [0, nmax] (scaled is never below 0 here)."""
    return jnp.minimum(jnp.trunc(scaled).astype(jnp.uint8), jnp.uint8(nmax))


@jax.jit
def quantize_q8_0(blocks: jax.Array) -> jax.Array:
    """float32 [n, 32] -> Q8_0 blocks uint8 [n, 34]."""
    d = _divide(jnp.max(jnp.abs(blocks), axis=1), 127)
    q = jax.lax.round(blocks * _inverse(d)[:, None], jax.lax.RoundingMethod.AWAY_FROM_ZERO)
    return jnp.concatenate([_f16_bytes(d), jax.lax.bitcast_convert_type(
        q.astype(jnp.int8), jnp.uint8)], axis=1)


def _symmetric(blocks: jax.Array, half: int) -> tuple[jax.Array, jax.Array]:
    """(d [n], levels [n, 32]) of Q4_0 (half=8) / Q5_0 (half=16)."""
    d = _divide(_signed_max(blocks), -half)
    q = _levels(_rounded(blocks * _inverse(d)[:, None]) + f32(half + 0.5), 2 * half - 1)
    return d, q


def _affine(blocks: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(d [n], min [n], levels [n, 32]) of Q4_1 (nmax=15) / Q5_1 (nmax=31)."""
    mx, mn = jnp.max(blocks, axis=1), jnp.min(blocks, axis=1)
    d = _divide(mx - mn, nmax)
    q = _levels(_rounded((blocks - mn[:, None]) * _inverse(d)[:, None]) + f32(0.5), nmax)
    return d, mn, q


@jax.jit
def quantize_q4_0(blocks: jax.Array) -> jax.Array:
    """float32 [n, 32] -> Q4_0 blocks uint8 [n, 18]."""
    d, q = _symmetric(blocks, 8)
    return jnp.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)


@jax.jit
def quantize_q5_0(blocks: jax.Array) -> jax.Array:
    """float32 [n, 32] -> Q5_0 blocks uint8 [n, 22]."""
    d, q = _symmetric(blocks, 16)
    return jnp.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


@jax.jit
def quantize_q4_1(blocks: jax.Array) -> jax.Array:
    """float32 [n, 32] -> Q4_1 blocks uint8 [n, 20]."""
    d, mn, q = _affine(blocks, 15)
    return jnp.concatenate([_f16_bytes(d), _f16_bytes(mn), _nibbles(q)], axis=1)


@jax.jit
def quantize_q5_1(blocks: jax.Array) -> jax.Array:
    """float32 [n, 32] -> Q5_1 blocks uint8 [n, 24]."""
    d, mn, q = _affine(blocks, 31)
    return jnp.concatenate([_f16_bytes(d), _f16_bytes(mn), _high_bits(q), _nibbles(q)], axis=1)


QUANTIZE = {"Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1, "Q5_0": quantize_q5_0,
            "Q5_1": quantize_q5_1, "Q8_0": quantize_q8_0}

__all__ = ["BLOCK", "BLOCK_BYTES", "QUANTIZE", "quantize_q4_0", "quantize_q4_1", "quantize_q5_0",
           "quantize_q5_1", "quantize_q8_0"]
