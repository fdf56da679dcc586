"""Cheap NF4 nibble decode for every NF4 kernel: a byte-permute (`prmt`) lookup table.

A code byte holds two NF4 indices (element 2i in the high nibble, 2i+1 in the low nibble). The
decode maps one byte to one uint32 "pair": bf16(NF4[hi]) in bits 0-15 and bf16(NF4[lo]) in bits
16-31, optionally multiplied (bf16x2 FMA) by the block scale given as a bf16 pair (s, s).

On NVIDIA GPUs this is inline PTX: the 16 bf16 values are split into a low-byte and a high-byte
table of 16 bytes each (4 registers, compile-time immediates); `prmt.b32` looks up four 3-bit
indices at once in 8 bytes, a third `prmt` picks the half (entries 0-7 or 8-15) from bit 3 of
each nibble, and two more `prmt`s assemble the bf16 pairs: about 2.75 instructions per weight
instead of a 15-select tree (~25). Off GPU (interpret mode) `nf4_pairs` computes the same pairs
with jnp (select tree in float32), so CPU tests check the kernels' data flow; `emulate_prmt_lut`
replays the PTX algorithm in numpy, so CPU tests check the tables and selectors too.

Helpers turn pairs into the two planes: float32 (`pairs_to_f32`: a shift / a mask, exact) or
bf16 (`pairs_to_bf16`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plt

from fastlora_jax.quant import NF4_MAP

_NF4 = [float(v) for v in NF4_MAP]
# numpy (ml_dtypes) rounding, not a jnp op: importing this module inside a jit must not trace.
NF4_BF16_BITS: np.ndarray = np.asarray(NF4_MAP, np.float32).astype(jnp.bfloat16).view(np.uint16)


def table_words(byte_of: np.ndarray) -> list[int]:
    """16 bytes -> 4 little-endian uint32 words (word w holds entries 4w..4w+3)."""
    b = byte_of.astype(np.uint32)
    return [int(b[4 * w] | b[4 * w + 1] << 8 | b[4 * w + 2] << 16 | b[4 * w + 3] << 24)
            for w in range(4)]


LO_WORDS = table_words(NF4_BF16_BITS & 0xFF)   # low byte of each bf16 value
HI_WORDS = table_words(NF4_BF16_BITS >> 8)     # high byte (sign + exponent bits)
# Byte selectors assembling, from lb = [L(l0), L(h0), L(l1), L(h1)] and hb (same for high bytes),
# the pairs of byte 0 = [L(h0), H(h0), L(l0), H(l0)] and of byte 1 = [L(h1), H(h1), L(l1), H(l1)].
PAIR_SEL = (0x4051, 0x6273)


def _half(src: str, sel: str, tag: str, outs: tuple[str, str]) -> str:
    """PTX for two code bytes: index register `src` (nibbles & 7), half selector `sel`."""
    lo, hi = [f"0x{w:08x}" for w in LO_WORDS], [f"0x{w:08x}" for w in HI_WORDS]
    return f"""
    prmt.b32 a{tag}, {lo[0]}, {lo[1]}, {src};
    prmt.b32 b{tag}, {lo[2]}, {lo[3]}, {src};
    prmt.b32 lb{tag}, a{tag}, b{tag}, {sel};
    prmt.b32 a{tag}, {hi[0]}, {hi[1]}, {src};
    prmt.b32 b{tag}, {hi[2]}, {hi[3]}, {src};
    prmt.b32 hb{tag}, a{tag}, b{tag}, {sel};
    prmt.b32 {outs[0]}, lb{tag}, hb{tag}, 0x{PAIR_SEL[0]:04x};
    prmt.b32 {outs[1]}, lb{tag}, hb{tag}, 0x{PAIR_SEL[1]:04x};"""


def _pairs_asm(scaled: bool) -> str:
    """4 code bytes in $4 -> 4 pairs $0..$3 (scaled: times the bf16 pairs $5..$8)."""
    outs = ("p0", "p1", "p2", "p3") if scaled else ("$0", "$1", "$2", "$3")
    body = f"""{{
    .reg .b32 idx, sel, idx2, sel2, a0, b0, lb0, hb0, a1, b1, lb1, hb1, p0, p1, p2, p3, nz;
    and.b32 idx, $4, 0x77777777;
    shr.u32 sel, $4, 1;
    and.b32 sel, sel, 0x44444444;
    or.b32 sel, sel, 0x32103210;
    shr.u32 idx2, idx, 16;
    shr.u32 sel2, sel, 16;"""
    body += _half("idx", "sel", "0", outs[:2]) + _half("idx2", "sel2", "1", outs[2:])
    if scaled:
        body += """
    mov.b32 nz, 0x80008000;
    fma.rn.bf16x2 $0, p0, $5, nz;
    fma.rn.bf16x2 $1, p1, $6, nz;
    fma.rn.bf16x2 $2, p2, $7, nz;
    fma.rn.bf16x2 $3, p3, $8, nz;"""
    return body + "\n}"


ASM_PLAIN = _pairs_asm(scaled=False)
ASM_SCALED = _pairs_asm(scaled=True)

# Byte selectors assembling the two bf16 planes of two code bytes b0, b1 as pairs:
# [hi(b0), hi(b1)] and [lo(b0), lo(b1)] (for register layouts holding two adjacent bytes' weights,
# e.g. wgmma's A operand).
PLANE_SEL = (0x7351, 0x6240)


# Eight code bytes of one weight row, loaded by the asm itself from the shared-memory address $8
# (one 8-byte load) -> the planes of its four byte pairs: $0/$1 = (hi, lo) planes of bytes 0-1,
# $2/$3 of bytes 2-3, $4/$5 of bytes 4-5, $6/$7 of bytes 6-7.
def _row_word(word: str, outs: tuple[str, str, str, str]) -> str:
    body = f"""
    and.b32 idx, {word}, 0x77777777;
    shr.u32 sel, {word}, 1;
    and.b32 sel, sel, 0x44444444;
    or.b32 sel, sel, 0x32103210;
    shr.u32 idx2, idx, 16;
    shr.u32 sel2, sel, 16;"""
    for tag, (i, sl), o in (("0", ("idx", "sel"), outs[:2]), ("1", ("idx2", "sel2"), outs[2:])):
        body += (_half(i, sl, tag, o)
                 .replace(f"0x{PAIR_SEL[0]:04x};", f"0x{PLANE_SEL[0]:04x};")
                 .replace(f"0x{PAIR_SEL[1]:04x};", f"0x{PLANE_SEL[1]:04x};"))
    return body


ASM_ROW_PLANES = ("""{
    .reg .b32 w0, w1, idx, sel, idx2, sel2, a0, b0, lb0, hb0, a1, b1, lb1, hb1;
    ld.shared.v2.u32 {w0, w1}, [$8];""" + _row_word("w0", ("$0", "$1", "$2", "$3"))
                  + _row_word("w1", ("$4", "$5", "$6", "$7")) + "\n}")


def nf4_lookup(nibble: jax.Array) -> jax.Array:
    """int32 codes in [0, 16) -> float32 NF4 values, by a 15-select tree (no gather)."""
    bits = [(nibble & (1 << b)) != 0 for b in range(4)]
    level = [jnp.where(bits[0], jnp.float32(_NF4[2 * i + 1]), jnp.float32(_NF4[2 * i]))
             for i in range(8)]
    for b in range(1, 4):
        level = [jnp.where(bits[b], level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _bf16_bits(v: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(v.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def nf4_pairs(codes: jax.Array, scale_pair: jax.Array | None, use_asm: bool) -> jax.Array:
    """codes uint8 [r, c] (+ scale pairs uint32, broadcastable to [r, c]) -> pairs uint32 [r, c].

    pair = bf16(NF4[hi] * s) | bf16(NF4[lo] * s) << 16, s = 1 without scale_pair. `use_asm`:
    the PTX lookup (GPU only); otherwise a jnp select tree (interpret mode, any backend).
    """
    if use_asm:
        args = [codes]
        if scale_pair is not None:
            args.append(jnp.broadcast_to(scale_pair, codes.shape))
        [out] = plt.elementwise_inline_asm(
            ASM_SCALED if scale_pair is not None else ASM_PLAIN, args=args,
            constraints="=r,=r,=r,=r,r" + (",r,r,r,r" if scale_pair is not None else ""),
            pack=4, result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.int32)])
        # int32: Triton's op takes signless integers only (uint32 lowers to ui32).
        return jax.lax.bitcast_convert_type(out, jnp.uint32)
    q = codes.astype(jnp.int32)
    hi, lo = nf4_lookup(q >> 4), nf4_lookup(q & 0xF)
    if scale_pair is not None:
        s = jax.lax.bitcast_convert_type((scale_pair & 0xFFFF).astype(jnp.uint16),
                                         jnp.bfloat16).astype(jnp.float32)
        hi, lo = hi * s, lo * s
    return _bf16_bits(hi) | (_bf16_bits(lo) << 16)


def pairs_to_f32(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 pairs -> (hi, lo) float32 planes (exact: bf16 bits moved to the top half)."""
    hi = jax.lax.bitcast_convert_type(pairs << 16, jnp.float32)
    lo = jax.lax.bitcast_convert_type(pairs & jnp.uint32(0xFFFF0000), jnp.float32)
    return hi, lo


def pairs_to_bf16(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 pairs -> (hi, lo) bf16 planes."""
    hi = jax.lax.bitcast_convert_type(pairs.astype(jnp.uint16), jnp.bfloat16)
    lo = jax.lax.bitcast_convert_type((pairs >> 16).astype(jnp.uint16), jnp.bfloat16)
    return hi, lo


def scale_pairs(scales: jax.Array) -> jax.Array:
    """float32 block scales (any shape) -> uint32 bf16 pairs (s, s) for the scaled lookup."""
    b = _bf16_bits(scales)
    return b | (b << 16)


def prmt_b32(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode) on Python ints: byte k of the result is byte (c >> 4k) & 7 of
    the 8-byte value b:a, or that byte's sign replicated when bit 3 of the selector is set."""
    src = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    out = 0
    for k in range(4):
        s = (c >> (4 * k)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def lookup_bytes(words: list[int], idx: int, sel: int) -> int:
    """The 3-prmt lookup of one 16-byte table (4 words) for 4 nibbles: index bits `idx`, half
    selector `sel` (as the PTX computes them)."""
    return prmt_b32(prmt_b32(words[0], words[1], idx), prmt_b32(words[2], words[3], idx), sel)


def emulate_prmt_lut(word: int) -> list[int]:
    """Replays ASM_PLAIN on one uint32 of 4 code bytes -> the 4 pairs (for CPU tests)."""
    idx = word & 0x77777777
    sel = ((word >> 1) & 0x44444444) | 0x32103210
    pairs = []
    for i, s in ((idx, sel), (idx >> 16, sel >> 16)):
        lb, hb = lookup_bytes(LO_WORDS, i, s), lookup_bytes(HI_WORDS, i, s)
        pairs += [prmt_b32(lb, hb, PAIR_SEL[0]), prmt_b32(lb, hb, PAIR_SEL[1])]
    return pairs


def emulate_row_planes(row_bytes: bytes) -> list[int]:
    """Replays ASM_ROW_PLANES on 8 code bytes -> [hi, lo] plane pairs of bytes 0-1, 2-3, 4-5, 6-7
    (for CPU tests)."""
    out = []
    for w in (int.from_bytes(row_bytes[:4], "little"), int.from_bytes(row_bytes[4:], "little")):
        for half in (w & 0xFFFF, w >> 16):
            out += list(emulate_prmt_planes(half))
    return out


def emulate_prmt_planes(half_word: int) -> tuple[int, int]:
    """Replays ASM_ROW_PLANES' per-pair step on two code bytes (bits 0-15) -> (hi pair, lo
    pair) (for CPU tests)."""
    idx = half_word & 0x7777
    sel = ((half_word >> 1) & 0x4444) | 0x3210
    lb, hb = lookup_bytes(LO_WORDS, idx, sel), lookup_bytes(HI_WORDS, idx, sel)
    return prmt_b32(lb, hb, PLANE_SEL[0]), prmt_b32(lb, hb, PLANE_SEL[1])
