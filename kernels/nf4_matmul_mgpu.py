"""Hopper NF4 matmul on Mosaic GPU: the decoded weight is wgmma's register operand.

y [M, N] = x [M, K] @ dequantize(w [N, K]).T is computed transposed, y^T = W @ x^T, so that W
(64 rows per warpgroup) is wgmma's A operand, which may live in registers, and x^T its B operand
in shared memory (N dimension 8..256, so M = 1..16 decode and M = 8192 training use the same
kernel). Per pipeline step (`blocks_per_step` 64-weight quantization blocks, TMA-fed,
`max_concurrent_steps` deep) the warpgroup, for each block of the step:
  1. loads its codes [64, 32] uint8 from shared memory in wgmma's register layout (two adjacent
     bytes per register);
  2. turns each byte pair into the high-nibble and low-nibble bf16 planes with the prmt lookup of
     `nf4_matmul_lut.py` (inline PTX, ~6 instructions per byte);
  3. multiplies each row by its block's absmax (bf16) and issues two wgmmas: the high plane against
     x's even columns, the low plane against its odd columns (x split once by XLA);
then waits for its wgmmas once per step. On the H200 two blocks per step beat one (fewer, larger
TMA copies and waits); more CTAs per SM (split-K 8) helped again: the decode's instruction chain
needs many warps to hide its latency.
The launch, pipeline and output (float32 split-K partials that XLA sums, transposes and casts)
are `weight_stream_mgpu.py`'s, shared with the int8 kernel. GPU only (sm_90): inline PTX does
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
from fastlora_jax.kernels.nf4_matmul_lut import ASM_PLANES_2B, nf4_lookup
from fastlora_jax.kernels.weight_stream_mgpu import (ROWS, MgpuTuning, Stream, default_splits,
                                                     finish_output, plan, stream_matmul,
                                                     tile_for)

__all__ = ["MgpuTuning", "default_splits", "nf4_matmul_mgpu"]

BLOCK_BYTES = 32   # code bytes per row of one 64-weight quantization block
_X_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))


def _decode_planes(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 [64, 32] (wgmma layout) -> (hi, lo) bf16 [64, 32] planes in the same layout."""
    out = plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=(out, out))
    def decode(_, fa):
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        struct = llvm.StructType.get_literal([i32, i32])
        hi, lo = np.empty_like(fa.registers), np.empty_like(fa.registers)
        for idx, reg in np.ndenumerate(fa.registers):
            word = arith.extui(i32, mgpu.utils.bitcast(reg, i16))
            res = llvm.inline_asm(struct, [word], ASM_PLANES_2B, "=r,=r,r")
            hi[idx] = mgpu.utils.bitcast(llvm.extractvalue(i32, res, [0]), pair)
            lo[idx] = mgpu.utils.bitcast(llvm.extractvalue(i32, res, [1]), pair)
        return (mgpu.FragmentedArray(_registers=hi, _layout=fa.layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=lo, _layout=fa.layout, _is_signed=None))

    return decode(codes)


def _decode_planes_jnp(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Interpret-mode stand-in for _decode_planes (same values, select tree)."""
    q = codes.astype(jnp.int32)
    return (nf4_lookup(q >> 4).astype(jnp.bfloat16), nf4_lookup(q & 0xF).astype(jnp.bfloat16))


def _decoded(c_smem, b: int, use_asm: bool) -> tuple[jax.Array, jax.Array]:
    """Block b of the step's codes, decoded into the (hi, lo) bf16 planes."""
    with jax.named_scope("decode"):
        codes = plgpu.load(c_smem.at[:, pl.ds(b * BLOCK_BYTES, BLOCK_BYTES)],
                           layout=plgpu.Layout.WGMMA, optimized=False)
        return _decode_planes(codes) if use_asm else _decode_planes_jnp(codes)


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
    """One pipeline step (absmax on the weights): codes [64, bps*32] u8, xe/xo [tile_m, bps*32],
    scales^T [bps, 64]; accumulates into the K loop's wgmma accumulator."""
    def body(c_smem, xe_smem, xo_smem, s_smem, acc_ref, a_smem=None):
        for b in range(bps):
            hi, lo = _decoded(c_smem, b, use_asm)
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
    def body(c_smem, xe_smem, xo_smem, s_smem, total, a_smem=None):
        def step(*partials):
            for b in range(bps):
                hi, lo = _decoded(c_smem, b, use_asm)
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
    codes = pad_axis(codes, 0, ROWS)
    scales_t = pad_axis(scales, 0, ROWS).T                       # [K/64, Np]
    grid = plan("nf4_matmul_mgpu", codes.shape[0], xp.shape[0], k // 64, tuning)
    kb = grid.steps * bps * BLOCK_BYTES                          # code bytes per CTA
    step_bytes = bps * BLOCK_BYTES
    x_spec = plgpu.BlockSpec((tile_m, step_bytes), lambda t: (0, t), transforms=_X_TRANSFORMS)
    x_view = lambda ref, rows, cols, s: ref.at[cols, pl.ds(s * kb, kb)]  # noqa: E731
    streams = [
        Stream(codes, lambda ref, rows, cols, s: ref.at[rows, pl.ds(s * kb, kb)],
               plgpu.BlockSpec((ROWS, step_bytes), lambda t: (0, t))),
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
                        register_acc=tuning.acc_scale, interpret=interpret)
    return finish_output(out, n, m, x.dtype)
