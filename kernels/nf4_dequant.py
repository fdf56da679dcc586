"""Bandwidth-bound NF4 dequantization kernel, and dequantize-then-dot built on it.

`nf4_dequantize(w)` turns an NF4 QTensor [N, K] (bitsandbytes layout, double-quantized absmax)
into a bf16 / fp16 [N, K] array; `fastlora_jax.quant.dequantize` is its reference. The weight is
read as what it is in memory: `nb = ceil(N*K / 64)` quantization blocks of 32 code bytes, one
absmax byte each, so the kernel is a 1-D grid over tiles of `block_rows` blocks and any N (odd
included) works; only the ragged tail of a weight with N*K % 64 != 0 costs an extra pad / slice.

Per tile of one launch: the absmax of each block, decoded to float32 by one small XLA op before
the launch (`nf4_block_scales`: 1/16 B per weight more traffic, and the 256-entry map stays out of
the kernel); each code byte becomes its two weights (high nibble = even element) by a float32
NF4 value from a byte-permute (`prmt`) lookup of its four bytes (one 16-byte table per byte
plane, as in `nf4_lookup.py`), times the float32 absmax (`mul.rn.f32`), rounded once to the
output dtype (`cvt.rn.bf16x2.f32`): bit for bit the reference given the same absmax, ~7
instructions per weight (XLA may fuse the absmax's mul + add into an FMA under jit, as it does on
the CPU, which can flip a few roundings against an eager reference). The two planes are
interleaved in registers (a Triton join) and stored as [rows, 64]. Bytes moved per weight: 0.5
read (codes) + 1/64 (absmax) + 2 written.

`dequant_then_dot(x, w)` = this kernel + XLA's GEMM (float32 accumulation, x.dtype out), with a
custom VJP giving dx = dy @ W by the same two steps and no gradient to the frozen w (the residual
is the NF4 weight, not its bf16 copy: the QLoRA memory choice).
Pallas on the Triton backend on GPU, interpreted (jnp select tree instead of PTX) elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_lookup import nf4_lookup, prmt_b32, table_words
from fastlora_jax.kernels.quant_matmul_common import check_dy, check_x, zero_cotangent
from fastlora_jax.ops import defaults
from fastlora_jax.ops.impl import interpreted
from fastlora_jax.quant import NF4_MAP, QTensor, QuantKind, nf4_block_scales

BLOCK = 64            # weights per absmax block (the only NF4 blocksize the kernel takes)
CODE_BYTES = BLOCK // 2
OUT_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class DequantTuning:
    """One dequantization launch: `block_rows` 64-weight blocks per program (a power of two
    >= 16) and `num_warps` per program. `measured()` gives the default (ops/defaults.py)."""

    block_rows: int
    num_warps: int

    def __post_init__(self) -> None:
        for name in ("block_rows", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise KernelError(f"DequantTuning.{name}={value} must be a power of two")
        if self.block_rows < 16:
            raise KernelError(f"DequantTuning.block_rows={self.block_rows} must be >= 16")

    @classmethod
    def measured(cls) -> DequantTuning:
        return cls(*defaults.DEQUANT_BLOCKS)


# --- the float32 prmt lookup ----------------------------------------------------------------
NF4_F32_BITS: np.ndarray = np.asarray(NF4_MAP, np.float32).view(np.uint32)
PLANE_WORDS = [table_words((NF4_F32_BITS >> (8 * p)) & 0xFF) for p in range(4)]
# Byte transpose: from q0..q3 (byte p of the 4 looked-up values), t = interleave bytes 0-1
# (0x5140) or 2-3 (0x7362) of two registers, then word j = low (0x5410) / high (0x7632) halves.
INTERLEAVE_SEL = (0x5140, 0x7362)
HALVES_SEL = (0x5410, 0x7632)


def _f32_half(src: str, sel: str, tag: str) -> str:
    """PTX: 4 nibbles (index register `src`, half selector `sel`) -> float32 NF4 values in
    v{tag}0..v{tag}3, in nibble order [lo(byte 0), hi(byte 0), lo(byte 1), hi(byte 1)]."""
    lines = []
    for p in range(4):
        w = [f"0x{v:08x}" for v in PLANE_WORDS[p]]
        lines += [f"prmt.b32 a, {w[0]}, {w[1]}, {src};", f"prmt.b32 b, {w[2]}, {w[3]}, {src};",
                  f"prmt.b32 q{p}, a, b, {sel};"]
    lines += [f"prmt.b32 t0, q0, q1, 0x{INTERLEAVE_SEL[0]:04x};",
              f"prmt.b32 t1, q0, q1, 0x{INTERLEAVE_SEL[1]:04x};",
              f"prmt.b32 t2, q2, q3, 0x{INTERLEAVE_SEL[0]:04x};",
              f"prmt.b32 t3, q2, q3, 0x{INTERLEAVE_SEL[1]:04x};",
              f"prmt.b32 v{tag}0, t0, t2, 0x{HALVES_SEL[0]:04x};",
              f"prmt.b32 v{tag}1, t0, t2, 0x{HALVES_SEL[1]:04x};",
              f"prmt.b32 v{tag}2, t1, t3, 0x{HALVES_SEL[0]:04x};",
              f"prmt.b32 v{tag}3, t1, t3, 0x{HALVES_SEL[1]:04x};"]
    return "\n    ".join(lines)


def exact_asm(cvt: str) -> str:
    """4 code bytes in $4, float32 absmax bits in $5..$8 (one per byte) -> 4 pairs $0..$3:
    out(NF4[hi] * s) in bits 0-15, out(NF4[lo] * s) in bits 16-31; `cvt` = bf16x2 or f16x2."""
    scaled = []
    for byte in range(4):
        tag, j = divmod(byte, 2)
        lo, hi = f"v{tag}{2 * j}", f"v{tag}{2 * j + 1}"
        scaled += [f"mul.rn.f32 {lo}, {lo}, ${5 + byte};", f"mul.rn.f32 {hi}, {hi}, ${5 + byte};",
                   f"cvt.rn.{cvt}.f32 ${byte}, {lo}, {hi};"]   # a -> upper half, b -> lower
    return ("{\n    .reg .b32 idx, sel, idx2, sel2, a, b, q0, q1, q2, q3, t0, t1, t2, t3;\n"
            "    .reg .b32 v00, v01, v02, v03, v10, v11, v12, v13;\n"
            "    and.b32 idx, $4, 0x77777777;\n    shr.u32 sel, $4, 1;\n"
            "    and.b32 sel, sel, 0x44444444;\n    or.b32 sel, sel, 0x32103210;\n"
            "    shr.u32 idx2, idx, 16;\n    shr.u32 sel2, sel, 16;\n    "
            + _f32_half("idx", "sel", "0") + "\n    " + _f32_half("idx2", "sel2", "1")
            + "\n    " + "\n    ".join(scaled) + "\n}")


ASM_EXACT = {"bfloat16": exact_asm("bf16x2"), "float16": exact_asm("f16x2")}


def emulate_f32_lookup(word: int) -> list[int]:
    """Replays the lookup of `exact_asm` on one uint32 of 4 code bytes -> the float32 bits of the
    8 NF4 values in nibble order (low nibble of byte 0 first), for CPU tests."""
    idx = word & 0x77777777
    sel = ((word >> 1) & 0x44444444) | 0x32103210
    out = []
    for i, s in ((idx, sel), (idx >> 16, sel >> 16)):
        q = [prmt_b32(prmt_b32(w[0], w[1], i), prmt_b32(w[2], w[3], i), s) for w in PLANE_WORDS]
        t = [prmt_b32(q[0], q[1], INTERLEAVE_SEL[0]), prmt_b32(q[0], q[1], INTERLEAVE_SEL[1]),
             prmt_b32(q[2], q[3], INTERLEAVE_SEL[0]), prmt_b32(q[2], q[3], INTERLEAVE_SEL[1])]
        out += [prmt_b32(t[0], t[2], HALVES_SEL[0]), prmt_b32(t[0], t[2], HALVES_SEL[1]),
                prmt_b32(t[1], t[3], HALVES_SEL[0]), prmt_b32(t[1], t[3], HALVES_SEL[1])]
    return out


# --- the kernel -----------------------------------------------------------------------------
def _bits(a: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, jnp.uint32)


def _inline_asm(text: str, args: list[jax.Array], outs: int, pack: int, shape) -> jax.Array:
    """`outs` 32-bit results per `pack` elements; each arg takes pack * itemsize / 4 registers
    (4 uint8 codes share one)."""
    regs = sum(max(1, pack * a.dtype.itemsize // 4) for a in args)
    cons = ",".join(["=r"] * outs + ["r"] * regs)
    [out] = plt.elementwise_inline_asm(text, args=args, constraints=cons, pack=pack,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])
    return jax.lax.bitcast_convert_type(out, jnp.uint32)


def _dequant_kernel(c_ref, s_ref, o_ref, *, nb: int, use_asm: bool):
    """codes u8 [tb, 32] + decoded absmax f32 [tb] -> weights [tb, 64] in o_ref's dtype. Masked
    only when nb is not a multiple of tb."""
    tb = c_ref.shape[0]
    out_dtype = o_ref.dtype
    row = pl.program_id(0) * tb + jnp.arange(tb, dtype=jnp.int32)          # block index [tb]
    valid = (row < nb) if nb % tb else None
    codes = plt.load(c_ref, mask=None if valid is None else valid[:, None], other=None
                     if valid is None else 0)
    scale = plt.load(s_ref, mask=valid, other=None if valid is None else 0.0)
    if use_asm:
        s = jnp.broadcast_to(_bits(scale)[:, None], codes.shape)
        pairs = _inline_asm(ASM_EXACT[jnp.dtype(out_dtype).name], [codes, s], 4, 4, codes.shape)
        hi = jax.lax.bitcast_convert_type((pairs & 0xFFFF).astype(jnp.uint16), out_dtype)
        lo = jax.lax.bitcast_convert_type((pairs >> 16).astype(jnp.uint16), out_dtype)
    else:  # the same math in jnp
        q = codes.astype(jnp.int32)
        s, hi, lo = scale[:, None], nf4_lookup(q >> 4), nf4_lookup(q & 0xF)
        hi, lo = (hi * s).astype(out_dtype), (lo * s).astype(out_dtype)
    w = jnp.stack([hi, lo], axis=-1).reshape(tb, BLOCK)                    # element 2i, 2i + 1
    plt.store(o_ref, w, mask=None if valid is None else valid[:, None])


def _check_dequant(w: QTensor, dtype: str) -> None:
    if w.kind is not QuantKind.NF4 or w.blocksize != BLOCK:
        raise KernelError(f"nf4_dequantize: w.kind={w.kind.value}, w.blocksize={w.blocksize}; "
                          f"expected nf4 with blocksize {BLOCK} (use quant.dequantize otherwise)")
    if w.lead:
        raise KernelError(f"nf4_dequantize: w has leading axes {w.lead}; index one matrix "
                          f"(w[i]) first")
    if dtype not in OUT_DTYPES:
        raise KernelError(f"nf4_dequantize: dtype={dtype!r} is not one of {OUT_DTYPES}; use "
                          f"quant.dequantize for other output dtypes")


def nf4_dequantize(w: QTensor, dtype: str | jnp.dtype | None = None, *,
                   tuning: DequantTuning | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """NF4 QTensor [N, K] (no leading axes) -> [N, K] in `dtype` (default w.dtype; bfloat16 or
    float16): `quant.dequantize(w, dtype)` bit for bit (see the module docstring for the
    absmax's FMA caveat under jit)."""
    tuning = tuning or DequantTuning.measured()
    dtype = jnp.dtype(dtype if dtype is not None else w.dtype).name
    _check_dequant(w, dtype)
    if interpret is None:
        interpret = interpreted()
    n, k = w.shape
    numel, nb = n * k, w.nblocks
    codes = jnp.asarray(w.codes)
    if codes.shape[0] != nb * CODE_BYTES:   # N*K % 64 != 0: pad the ragged last block
        codes = jnp.pad(codes, (0, nb * CODE_BYTES - codes.shape[0]))
    tb = min(tuning.block_rows, max(16, pl.next_power_of_2(nb)))
    out = pl.pallas_call(
        functools.partial(_dequant_kernel, nb=nb, use_asm=not interpret),
        out_shape=jax.ShapeDtypeStruct((nb, BLOCK), dtype),
        grid=(pl.cdiv(nb, tb),),
        in_specs=[pl.BlockSpec((tb, CODE_BYTES), lambda i: (i, 0)),
                  pl.BlockSpec((tb,), lambda i: (i,))],
        out_specs=pl.BlockSpec((tb, BLOCK), lambda i: (i, 0)),
        compiler_params=plt.CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret,
        name="nf4_dequantize",
    )(codes.reshape(nb, CODE_BYTES), nf4_block_scales(w))
    if nb * BLOCK != numel:
        return out.reshape(-1)[:numel].reshape(n, k)
    return out.reshape(n, k)


# --- dequantize-then-dot ----------------------------------------------------------------------
def _dot_in_dtype(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """a [M, c] . b (contracting b's axis `contract_b`) -> [M, .] in a.dtype (float32 sums)."""
    dims = (((1,), (contract_b,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dequant_then_dot(x: jax.Array, w: QTensor, tuning: DequantTuning | None,
                      interpret: bool) -> jax.Array:
    return _dot_in_dtype(x, nf4_dequantize(w, x.dtype, tuning=tuning, interpret=interpret), 1)


def _dequant_then_dot_fwd(x, w, tuning, interpret):
    # Residual: the QTensor only; the bwd dequantizes again rather than keep N*K*2 bytes alive.
    return _dequant_then_dot(x, w, tuning, interpret), w


def _dequant_then_dot_bwd(tuning, interpret, w, dy):
    return dequant_dx(dy, w, tuning=tuning, interpret=interpret), zero_cotangent(w)


_dequant_then_dot.defvjp(_dequant_then_dot_fwd, _dequant_then_dot_bwd)


def dequant_then_dot(x: jax.Array, w: QTensor, *, tuning: DequantTuning | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """y = x [M, K] @ nf4_dequantize(w [N, K]).T -> [M, N] in x.dtype (bf16 / fp16), float32
    accumulation by XLA's GEMM; differentiable in x (dx = dy @ W, same two steps), w frozen.
    Reference: `nf4_matmul.nf4_matmul_reference`."""
    check_x(x, w, "dequant_then_dot")
    if interpret is None:
        interpret = interpreted()
    return _dequant_then_dot(x, w, tuning, interpret)


def dequant_dx(dy: jax.Array, w: QTensor, *, tuning: DequantTuning | None = None,
               interpret: bool | None = None) -> jax.Array:
    """The backward alone: dx = dy [M, N] @ nf4_dequantize(w [N, K]) -> [M, K] in dy.dtype."""
    check_dy(dy, w, "dequant_dx")
    if interpret is None:
        interpret = interpreted()
    return _dot_in_dtype(dy, nf4_dequantize(w, dy.dtype, tuning=tuning, interpret=interpret), 0)
