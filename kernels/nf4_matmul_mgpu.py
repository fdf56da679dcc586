"""Hopper NF4 matmul on Mosaic GPU: the decoded weight is wgmma's register operand.

y [M, N] = x [M, K] @ dequantize(w [N, K]).T is computed transposed, y^T = W @ x^T, so that W
(64 rows per warpgroup) is wgmma's A operand, which may live in registers, and x^T its B operand
in shared memory (N dimension 8..256, so M = 1..16 decode and M = 8192 training use the same
kernel). Per pipeline step (`blocks_per_step` 64-weight quantization blocks, TMA-fed,
`max_concurrent_steps` deep) the warpgroup, for each block of the step:
  1. reads each of its two rows' 8 code bytes with one 8-byte shared-memory load (every block
     of the step is its own [64, 32] TMA copy, rows contiguous: no bank conflicts), in a column
     order that XLA's even/odd split of x matches (`swap_pairs`, `permute_x_planes`);
  2. turns them into the high-nibble and low-nibble bf16 planes with the prmt lookup of
     `nf4_matmul_lut.py` (inline PTX, ~5.5 instructions per byte);
  3. issues two wgmmas, the high plane against x's even columns and the low plane against its
     odd columns, after multiplying each row by its block's absmax (bf16), or, with
     `MgpuTuning.acc_scale`, into a zeroed per-block accumulator that is scaled (float32) and
     added after the step's wait;
then waits for its wgmmas once per step. On the H200 two or four blocks per step beat one (fewer
TMA waits); more CTAs per SM (split-K 8) helped again: the decode's instruction chain needs many
warps to hide its latency.
The launch, pipeline and output (float32 split-K partials, stored transposed, that XLA sums and
casts) are `weight_stream_mgpu.py`'s, shared with the int8 kernel. GPU only (sm_90): inline PTX does
not interpret (the interpreter runs a jnp decode instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_matmul_common import pad_axis
from fastlora_jax.kernels.nf4_matmul_lut import ASM_ROW_PLANES, nf4_lookup
from fastlora_jax.kernels.weight_stream_mgpu import (ROWS, MgpuTuning, Stream, default_splits,
                                                     finish_output, plan, stream_matmul,
                                                     tile_for)

__all__ = ["MgpuTuning", "default_splits", "nf4_matmul_mgpu"]

BLOCK_BYTES = 32   # code bytes per row of one 64-weight quantization block
_X_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))


def _decode_rows(c_ref) -> tuple[jax.Array, jax.Array]:
    """GPU: one block's codes [64, 32] u8 (contiguous rows) -> (hi, lo) bf16 planes in WGMMA
    layout, each thread reading its 2 x 8 code bytes with two 8-byte loads (ASM_ROW_PLANES)
    instead of eight 2-byte loads. Plane column j then holds code byte `swap_pairs`(j)'s nibbles:
    the thread owning columns (8q + 2c, +1) of its rows holds bytes (8c + 2q, +1), and x's planes
    are permuted to match (`permute_x_planes`)."""
    out = plgpu.ShapeDtypeStruct((ROWS, BLOCK_BYTES), jnp.bfloat16, plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(out, out))
    def decode(_, ref):
        i32 = ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        c = lambda v: mgpu.utils.c(v, i32)  # noqa: E731
        t = mgpu.utils.thread_idx()
        lane, warp = arith.andi(t, c(31)), arith.shrui(t, c(5))
        row = arith.addi(arith.muli(warp, c(16)), arith.shrui(lane, c(2)))
        offset = arith.addi(arith.muli(row, c(BLOCK_BYTES)),
                            arith.muli(arith.andi(lane, c(3)), c(8)))
        base = arith.addi(llvm.ptrtoint(i32, mgpu.utils.memref_ptr(ref)), offset)
        regs = mgpu.WGMMA_LAYOUT.registers_shape((ROWS, BLOCK_BYTES))
        hi, lo = np.empty(regs, dtype=object), np.empty(regs, dtype=object)
        struct = llvm.StructType.get_literal([i32] * 8)
        for h in range(2):  # the thread's rows r and r + 8
            addr = arith.addi(base, c(8 * BLOCK_BYTES * h))
            res = llvm.inline_asm(struct, [addr], ASM_ROW_PLANES, "=r," * 8 + "r",
                                  has_side_effects=True)
            for q in range(4):
                idx = (0, q, 0, 0, h) + (0,) * (len(regs) - 5)
                hi[idx] = mgpu.utils.bitcast(llvm.extractvalue(i32, res, [2 * q]), pair)
                lo[idx] = mgpu.utils.bitcast(llvm.extractvalue(i32, res, [2 * q + 1]), pair)
        layout = mgpu.WGMMA_LAYOUT
        return (mgpu.FragmentedArray(_registers=hi, _layout=layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=lo, _layout=layout, _is_signed=None))

    return decode(c_ref)


def swap_pairs(j: np.ndarray) -> np.ndarray:
    """Code byte of plane column j within a 32-byte block under `_decode_rows` (an involution:
    8q + 2c + e <-> 8c + 2q + e)."""
    q, c, e = j // 8, (j % 8) // 2, j % 2
    return 8 * c + 2 * q + e


def permute_x_planes(xp: jax.Array) -> jax.Array:
    """x's even or odd columns [M, K/2] reordered block by block by `swap_pairs`."""
    m, half = xp.shape
    return xp.reshape(m, half // 32, 4, 4, 2).swapaxes(2, 3).reshape(m, half)


def _decode_planes_jnp(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Interpret-mode decode of a WGMMA-layout code block (select tree, natural order)."""
    q = codes.astype(jnp.int32)
    return (nf4_lookup(q >> 4).astype(jnp.bfloat16), nf4_lookup(q & 0xF).astype(jnp.bfloat16))


def _decoded(codes: tuple, b: int, use_asm: bool) -> tuple[jax.Array, jax.Array]:
    """Block b of the step decoded into the (hi, lo) bf16 planes. GPU: `codes` holds one
    [64, 32] ref per block (`_decode_rows`); interpreter: one [64, bps * 32] ref (a WGMMA-layout
    load and a jnp decode, natural column order)."""
    with jax.named_scope("decode"):
        if use_asm:
            return _decode_rows(codes[b])
        block = plgpu.load(codes[0].at[:, pl.ds(b * BLOCK_BYTES, BLOCK_BYTES)],
                           layout=plgpu.Layout.WGMMA, optimized=False)
        return _decode_planes_jnp(block)


def _issue(acc_ref, a_hi, a_lo, xe_smem, xo_smem, b: int, a_smem) -> None:
    """The block's two wgmmas: hi plane x even columns, lo plane x odd columns."""
    if a_smem is not None:  # the interpreter's wgmma takes A from shared memory only
        a_smem[2 * b], a_smem[2 * b + 1] = a_hi, a_lo
        plgpu.commit_smem()
        a_hi, a_lo = a_smem.at[2 * b], a_smem.at[2 * b + 1]
    blk = pl.ds(b * BLOCK_BYTES, BLOCK_BYTES)
    plgpu.wgmma(acc_ref, a_hi, xe_smem.at[:, blk].transpose((1, 0)))
    plgpu.wgmma(acc_ref, a_lo, xo_smem.at[:, blk].transpose((1, 0)))


def _row_scales(s_smem, b: int, cols: int) -> jax.Array:
    """Block b's 64 absmax values (one per weight row) broadcast over `cols` in WGMMA layout."""
    s = plgpu.load(s_smem.at[b], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
    return lax.broadcast_in_dim(s, (ROWS, cols), (0,))


def _body(bps: int, use_asm: bool):
    """One pipeline step (absmax on the weights): the codes (`_decoded`), xe/xo
    [tile_m, bps*32], scales^T [bps, 64]; accumulates into the K loop's wgmma accumulator."""
    n_refs = (bps if use_asm else 1) + 4

    def body(*refs):
        *codes, xe_smem, xo_smem, s_smem, acc_ref = refs[:n_refs]
        a_smem = refs[n_refs] if len(refs) > n_refs else None
        for b in range(bps):
            hi, lo = _decoded(codes, b, use_asm)
            with jax.named_scope("scale"):
                s = plgpu.layout_cast(_row_scales(s_smem, b, BLOCK_BYTES).astype(jnp.bfloat16),
                                      plgpu.Layout.WGMMA)
                a_hi, a_lo = hi * s, lo * s
            _issue(acc_ref, a_hi, a_lo, xe_smem, xo_smem, b, a_smem)
        with jax.named_scope("wgmma_wait"):
            plgpu.wgmma_wait(0)

    return body


def _body_acc_scale(bps: int, tile_m: int, use_asm: bool):
    """One pipeline step (absmax on the accumulator): each block's unscaled wgmmas go to their own
    zeroed accumulator; after the wait, total += absmax * partial (float32)."""
    n_refs = (bps if use_asm else 1) + 4

    def body(*refs):
        *codes, xe_smem, xo_smem, s_smem, total = refs[:n_refs]
        a_smem = refs[n_refs] if len(refs) > n_refs else None

        def step(*partials):
            for b in range(bps):
                hi, lo = _decoded(codes, b, use_asm)
                _issue(partials[b], hi, lo, xe_smem, xo_smem, b, a_smem)
            with jax.named_scope("wgmma_wait"):
                plgpu.wgmma_wait(0)
            with jax.named_scope("scale"):
                out = total
                for b in range(bps):
                    out = out + partials[b][...] * _row_scales(s_smem, b, tile_m)
                return out

        return pl.run_scoped(step, *(plgpu.ACC((ROWS, tile_m), jnp.float32)
                                     for _ in range(bps)))

    return body


def nf4_matmul_mgpu(x: jax.Array, codes: jax.Array, scales: jax.Array, n: int,
                    tuning: MgpuTuning | None = None, interpret: bool = False) -> jax.Array:
    """x [M, K] bf16, codes uint8 [N, K/2], block scales f32 [N, K/64] -> y [M, N] in x.dtype.

    `interpret`: Mosaic GPU's CPU interpreter, with a jnp select tree instead of the inline PTX.
    """
    m, k = x.shape
    if k % 64:
        raise KernelError(f"nf4_matmul_mgpu: K={k} must be a multiple of 64 (the NF4 block)")
    if x.dtype != jnp.bfloat16:
        raise KernelError(f"nf4_matmul_mgpu: x.dtype={x.dtype} must be bfloat16 (wgmma operand)")
    tuning = tuning or MgpuTuning(tile_m=tile_for(m))
    tile_m, bps = tuning.tile_m, tuning.blocks_per_step
    xp = pad_axis(x, 0, tile_m)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    if not interpret:  # the GPU decode's column order (`_decode_rows`)
        xe, xo = permute_x_planes(xe), permute_x_planes(xo)
    codes = pad_axis(codes, 0, ROWS)
    scales_t = pad_axis(scales, 0, ROWS).T                       # [K/64, Np]
    grid = plan("nf4_matmul_mgpu", codes.shape[0], xp.shape[0], k // 64, tuning)
    kb = grid.steps * bps * BLOCK_BYTES                          # code bytes per CTA
    step_bytes = bps * BLOCK_BYTES
    x_spec = plgpu.BlockSpec((tile_m, step_bytes), lambda t: (0, t), transforms=_X_TRANSFORMS)
    x_view = lambda ref, rows, cols, s: ref.at[cols, pl.ds(s * kb, kb)]  # noqa: E731
    c_view = lambda ref, rows, cols, s: ref.at[rows, pl.ds(s * kb, kb)]  # noqa: E731
    if interpret:  # one [64, bps * 32] code block per step
        code_streams = [Stream(codes, c_view, plgpu.BlockSpec((ROWS, step_bytes),
                                                              lambda t: (0, t)))]
    else:  # one [64, 32] copy per block, rows contiguous for `_decode_rows`' 8-byte loads
        code_streams = [Stream(codes, c_view, plgpu.BlockSpec(
            (ROWS, BLOCK_BYTES), lambda t, b=b: (0, t * bps + b))) for b in range(bps)]
    streams = [
        *code_streams,
        Stream(xe, x_view, x_spec),
        Stream(xo, x_view, x_spec),
        Stream(scales_t, lambda ref, rows, cols, s: ref.at[pl.ds(s * grid.steps * bps,
                                                                  grid.steps * bps), rows],
               plgpu.BlockSpec((bps, ROWS), lambda t: (t, 0))),
    ]
    scratch = ((plgpu.SMEM((2 * bps, ROWS, BLOCK_BYTES), jnp.bfloat16,
                           transforms=_X_TRANSFORMS),) if interpret else ())
    body = (_body_acc_scale(bps, tile_m, not interpret) if tuning.acc_scale
            else _body(bps, not interpret))
    out = stream_matmul(streams, body, grid, tuning, x.dtype, scratch_types=scratch,
                        register_acc=tuning.acc_scale, m=m, interpret=interpret)
    return finish_output(out, n, m, x.dtype)
