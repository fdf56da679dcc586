"""Hopper NF4 matmul on Mosaic GPU: the decoded weight is wgmma's register operand.

y [M, N] = x [M, K] @ dequantize(w [N, K]).T is computed transposed, y^T = W @ x^T, so that W
(64 rows per warpgroup) is wgmma's A operand, which may live in registers, and x^T its B operand
in shared memory (N dimension 8..256, so M = 1..16 decode and M = 8192 training use the same
kernel). Per pipeline step (one 64-weight quantization block, TMA-fed, `max_concurrent_steps`
deep) each warpgroup:
  1. loads its codes [64, 32] uint8 from shared memory in wgmma's register layout (two adjacent
     bytes per register);
  2. turns each byte pair into the high-nibble and low-nibble bf16 planes with the prmt lookup of
     `nf4_matmul_lut.py` (inline PTX, ~6 instructions per byte);
  3. multiplies each row by its block's absmax (bf16) and issues two wgmmas: the high plane against
     x's even columns, the low plane against its odd columns (x split once by XLA);
then waits for its wgmmas once per step. More blocks per step means fewer, larger TMA copies
and fewer waits: at decode shapes the kernel is bound by the latency of this per-step chain.
Output: float32 partial sums [splits, N, M] (split-K over the grid) or bf16 when not split; XLA
sums, transposes and casts. GPU only (sm_90): inline PTX does not interpret.
"""

from __future__ import annotations

import dataclasses
import functools

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
from fastlora_jax.kernels.mgpu_profile import compiler_params
from fastlora_jax.kernels.nf4_matmul_common import pad_axis
from fastlora_jax.kernels.nf4_matmul_lut import ASM_PLANES_2B, nf4_lookup

ROWS = 64          # weight rows per warpgroup: wgmma's M
BLOCK_BYTES = 32   # code bytes per row per pipeline step: one 64-weight quantization block
_X_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))


@dataclasses.dataclass(frozen=True)
class MgpuTuning:
    """tile_m: x rows per CTA (wgmma's N: a multiple of 8, <= 256); max_concurrent_steps: TMA
    pipeline depth; splits: split-K factor (None: `default_splits`, 8 CTAs per SM of 132);
    blocks_per_step: 64-weight quantization blocks per pipeline step (1, 2, 4 or 8; K/64 must
    be a multiple of blocks_per_step * splits); profile_dir: Mosaic GPU's in-kernel profiler
    writes a trace of the named regions per launch there ("" = off)."""

    tile_m: int = 16
    max_concurrent_steps: int = 4
    splits: int | None = None
    blocks_per_step: int = 1
    profile_dir: str = ""

    def __post_init__(self) -> None:
        if self.tile_m % 8 or not 8 <= self.tile_m <= 256:
            raise KernelError(f"MgpuTuning.tile_m={self.tile_m} must be a multiple of 8 in "
                              f"[8, 256] (wgmma's N)")
        if self.max_concurrent_steps < 1:
            raise KernelError(f"MgpuTuning.max_concurrent_steps={self.max_concurrent_steps} "
                              f"must be >= 1")
        if self.blocks_per_step not in (1, 2, 4, 8):
            raise KernelError(f"MgpuTuning.blocks_per_step={self.blocks_per_step} must be 1, 2, "
                              f"4 or 8 (a TMA box is at most 256 code bytes wide)")


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


def _kernel(codes_gmem, xe_gmem, xo_gmem, s_gmem, out_gmem, o_smem, a_smem=None, *, steps: int,
            tile_m: int, splits: int, depth: int, bps: int, use_asm: bool):
    """codes [Np, K/2] u8, xe/xo [Mp, K/2] bf16, scales^T [K/64, Np] f32 -> out [S, Np, Mp]."""
    n_idx = lax.axis_index("n")
    j = lax.axis_index("mk")
    m_idx, s_idx = j // splits, j % splits
    step_bytes = bps * BLOCK_BYTES
    kb = steps * step_bytes
    rows = pl.ds(n_idx * ROWS, ROWS)
    cols = pl.ds(m_idx * tile_m, tile_m)
    kslice = pl.ds(s_idx * kb, kb)

    def body(_, c_smem, xe_smem, xo_smem, s_smem, acc_ref):
        for b in range(bps):
            blk = pl.ds(b * BLOCK_BYTES, BLOCK_BYTES)
            with jax.named_scope("decode"):
                codes = plgpu.load(c_smem.at[:, blk], layout=plgpu.Layout.WGMMA,
                                   optimized=False)
                hi, lo = _decode_planes(codes) if use_asm else _decode_planes_jnp(codes)
            with jax.named_scope("scale"):
                s = plgpu.load(s_smem.at[b], layout=plgpu.Layout.WGMMA.reduce(1),
                               optimized=False)
                s = plgpu.layout_cast(lax.broadcast_in_dim(s.astype(jnp.bfloat16),
                                                           (ROWS, BLOCK_BYTES), (0,)),
                                      plgpu.Layout.WGMMA)
                a_hi, a_lo = hi * s, lo * s
            if not use_asm:  # the interpreter's wgmma takes A from shared memory only
                a_smem[2 * b], a_smem[2 * b + 1] = a_hi, a_lo
                plgpu.commit_smem()
                a_hi, a_lo = a_smem.at[2 * b], a_smem.at[2 * b + 1]
            plgpu.wgmma(acc_ref, a_hi, plgpu.transpose_ref(xe_smem.at[:, blk], (1, 0)))
            plgpu.wgmma(acc_ref, a_lo, plgpu.transpose_ref(xo_smem.at[:, blk], (1, 0)))
        with jax.named_scope("wgmma_wait"):
            plgpu.wgmma_wait(0)

    def run(acc_ref):
        plgpu.emit_pipeline(
            lambda idx, *refs: body(idx, *refs, acc_ref),
            grid=(steps,),
            in_specs=[plgpu.BlockSpec((ROWS, step_bytes), lambda k: (0, k)),
                      plgpu.BlockSpec((tile_m, step_bytes), lambda k: (0, k),
                                      transforms=_X_TRANSFORMS),
                      plgpu.BlockSpec((tile_m, step_bytes), lambda k: (0, k),
                                      transforms=_X_TRANSFORMS),
                      plgpu.BlockSpec((bps, ROWS), lambda k: (k, 0))],
            max_concurrent_steps=depth,
        )(codes_gmem.at[rows, kslice], xe_gmem.at[cols, kslice], xo_gmem.at[cols, kslice],
          s_gmem.at[pl.ds(s_idx * steps * bps, steps * bps), rows])
        return acc_ref[...]

    acc = pl.run_scoped(run, plgpu.ACC((ROWS, tile_m), jnp.float32))
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[s_idx, rows, cols])
    plgpu.wait_smem_to_gmem(0)


# CTAs the default split-K aims for: 8 per SM of a 132-SM H100/H200. Each CTA is one warpgroup
# of 46-96 registers per thread, so residency is bounded by the grid, not by registers: on the
# H200 at K=4096 N=14336, M=1, splits 8 (1792 CTAs) ran the kernel in 22.0 us, splits 4 in 22.7,
# splits 2 (the old target of 2 per SM) in 25.8 (2026-11-29, GPU time from a profiler trace).
TARGET_CTAS = 1056


def default_splits(ctas: int, steps: int) -> int:
    """Power-of-two split of the K steps until the grid holds >= TARGET_CTAS CTAs."""
    splits = 1
    while ctas * splits < TARGET_CTAS and steps % (2 * splits) == 0 and splits < 16:
        splits *= 2
    return splits


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
    tuning = tuning or MgpuTuning(tile_m=min(256, max(8, -(-m // 8) * 8)))
    tile_m = tuning.tile_m
    xp = pad_axis(x, 0, tile_m)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    codes = pad_axis(codes, 0, ROWS)
    scales_t = pad_axis(scales, 0, ROWS).T                       # [K/64, Np]
    np_, mp = codes.shape[0], xp.shape[0]
    bps = tuning.blocks_per_step
    if (k // 64) % bps:
        raise KernelError(f"nf4_matmul_mgpu: blocks_per_step={bps} must divide K/64={k // 64}")
    steps_total = k // 64 // bps
    n_tiles, m_tiles = np_ // ROWS, mp // tile_m
    splits = tuning.splits or default_splits(n_tiles * m_tiles, steps_total)
    if steps_total % splits:
        raise KernelError(f"nf4_matmul_mgpu: splits={splits} must divide the "
                          f"K/64/blocks_per_step={steps_total} pipeline steps")
    out_dtype = jnp.float32 if splits > 1 else x.dtype
    call = plgpu.kernel(
        functools.partial(_kernel, steps=steps_total // splits, tile_m=tile_m, splits=splits,
                          depth=tuning.max_concurrent_steps, bps=bps, use_asm=not interpret),
        out_type=jax.ShapeDtypeStruct((splits, np_, mp), out_dtype),
        grid=(n_tiles, m_tiles * splits),
        grid_names=("n", "mk"),
        scratch_types=[plgpu.SMEM((ROWS, tile_m), out_dtype)] + (
            [plgpu.SMEM((2 * bps, ROWS, BLOCK_BYTES), jnp.bfloat16, transforms=_X_TRANSFORMS)]
            if interpret else []),
        compiler_params=compiler_params(tuning.profile_dir),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )
    out = call(codes, xe, xo, scales_t)
    y_t = out[0] if splits == 1 else out.sum(axis=0)
    return y_t[:n, :m].T.astype(x.dtype)
