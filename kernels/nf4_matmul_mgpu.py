"""Hopper NF4 matmul on Mosaic GPU: the decoded weight is wgmma's register operand.

y [M, N] = x [M, K] @ dequantize(w [N, K]).T is computed transposed, y^T = W x^T, so that W (ROWS =
64 rows per CTA, one warpgroup) is wgmma's A operand, which may live in registers, and x^T its B
operand in shared memory (wgmma's N = tile_m, 8..64 here: the decode shapes). The grid is
(N / 64, M / tile_m * splits): each CTA streams its rows' share of K (K / splits) through a TMA
pipeline `max_concurrent_steps` deep. Per pipeline step (`blocks_per_step` 64-weight
quantization blocks) the warpgroup, for each block of the step:
  1. reads each of its two rows' 8 code bytes with one 8-byte shared-memory load (every block
     of the step is its own [64, 32] TMA copy, rows contiguous: no bank conflicts), in a column
     order that XLA's even/odd split of x matches (`swap_pairs`, `permute_x_planes`);
  2. turns them into the high-nibble and low-nibble bf16 planes with the prmt lookup of
     `nf4_lookup.py` (inline PTX, ~5.5 instructions per byte);
  3. issues two wgmmas, the high plane against x's even columns and the low plane against its
     odd columns, into a zeroed accumulator of its own;
then waits for the step's wgmmas once and adds each block's product, times its absmax (float32),
to the register accumulator the K loop carries. The CTA's accumulator is stored transposed into
shared memory (`store_transposed`), so only x's real rows of the float32 split-K partials are
copied out, and XLA sums them and casts without a transpose (`finish_output`).
The absmax is decoded by XLA before the launch, as for the Triton kernels (`nf4_matmul.py`).
GPU only (sm_90): inline PTX does not interpret (the interpreter runs a jnp decode instead).
Why this shape and not others (one CTA per work item, 4 blocks per step, split-K towards 8 CTAs
per SM): docs/kernels.md and ops/defaults.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, vector

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.mgpu_profile import compiler_params
from fastlora_jax.kernels.nf4_lookup import ASM_ROW_PLANES, nf4_lookup
from fastlora_jax.kernels.nf4_matmul import MAX_M, nf4_operands, nf4_with_dx_kernel
from fastlora_jax.kernels.quant_matmul_common import (TritonMatmulTuning, check_x, pad_axis,
                                                      split_k)
from fastlora_jax.ops import defaults
from fastlora_jax.ops.impl import interpreted
from fastlora_jax.quant import QTensor

ROWS = 64          # weight rows per CTA: wgmma's M
BLOCK_BYTES = 32   # code bytes per row of one 64-weight quantization block
_X_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))


@dataclasses.dataclass(frozen=True)
class MosaicMatmulTuning:
    """tile_m: x rows per CTA (wgmma's N: a multiple of 8); max_concurrent_steps: TMA pipeline
    depth; splits: split-K factor (None: `split_k` towards defaults.MOSAIC_SPLIT_CTAS CTAs);
    blocks_per_step: 64-weight quantization blocks per pipeline step (1, 2, 4 or 8; K/64 must be
    a multiple of blocks_per_step * splits; each block has its own 64 x tile_m float32
    accumulator, so tile_m * blocks_per_step <= 64); profile_dir: Mosaic GPU's in-kernel
    profiler writes a trace of the named regions per launch there ("" = off). `for_m` gives the
    measured default (ops/defaults.py)."""

    tile_m: int
    max_concurrent_steps: int
    blocks_per_step: int
    splits: int | None = None
    profile_dir: str = ""

    def __post_init__(self) -> None:
        if self.tile_m % 8 or not 8 <= self.tile_m <= 64:
            raise KernelError(f"MosaicMatmulTuning.tile_m={self.tile_m} must be a multiple of 8 "
                              f"in [8, 64] (wgmma's N, at most 64 rows of x: the decode kernel)")
        if self.max_concurrent_steps < 1:
            raise KernelError(f"MosaicMatmulTuning.max_concurrent_steps="
                              f"{self.max_concurrent_steps} must be >= 1")
        if self.blocks_per_step not in (1, 2, 4, 8):
            raise KernelError(f"MosaicMatmulTuning.blocks_per_step={self.blocks_per_step} must be "
                              f"1, 2, 4 or 8 (a TMA box is at most 256 code bytes wide)")
        if self.tile_m * self.blocks_per_step > 64:
            raise KernelError(f"MosaicMatmulTuning needs tile_m * blocks_per_step <= 64 "
                              f"(registers of the per-block accumulators), got {self.tile_m} * "
                              f"{self.blocks_per_step}")

    @classmethod
    def for_m(cls, m: int, k: int) -> MosaicMatmulTuning:
        """The measured tuning for x [m, K]: tile_m = M rounded up to 8, the deepest blocks per
        step of defaults.MOSAIC_NF4_BLOCKS_PER_STEP that divides K / 64 and fits the registers."""
        tile = tile_for(m)
        bps = next(b for b in defaults.MOSAIC_NF4_BLOCKS_PER_STEP
                   if (k // 64) % b == 0 and tile * b <= 64)
        return cls(tile_m=tile, max_concurrent_steps=defaults.MOSAIC_NF4_DEPTH,
                   blocks_per_step=bps)


def tile_for(m: int) -> int:
    """The tile_m for M rows of x: M rounded up to a multiple of 8 (at least 8)."""
    return max(8, -(-m // 8) * 8)


@dataclasses.dataclass(frozen=True)
class Stream:
    """One pipelined operand: its GMEM array, `view(ref, rows, cols, split)` -> the CTA's part
    of it (rows: its weight rows, cols: its x rows, split: its split-K index), and the block one
    pipeline step copies (a BlockSpec over that part, indexed by the step)."""

    array: jax.Array
    view: Callable
    spec: plgpu.BlockSpec


@dataclasses.dataclass(frozen=True)
class Grid:
    """The launch: weight-row tiles, x-row tiles, split-K factor, pipeline steps per CTA."""

    n_tiles: int
    m_tiles: int
    splits: int
    steps: int


def plan(n_rows: int, m_rows: int, k_blocks: int, tuning: MosaicMatmulTuning) -> Grid:
    """The grid of a call: n_rows / m_rows already padded to ROWS / tile_m; k_blocks = K / 64."""
    bps = tuning.blocks_per_step
    if k_blocks % bps:
        raise KernelError(f"nf4_matmul_mosaic: blocks_per_step={bps} must divide "
                          f"K/64={k_blocks}")
    steps = k_blocks // bps
    n_tiles, m_tiles = n_rows // ROWS, m_rows // tuning.tile_m
    splits = tuning.splits or split_k(n_tiles * m_tiles, steps, defaults.MOSAIC_SPLIT_CTAS)
    if steps % splits:
        raise KernelError(f"nf4_matmul_mosaic: splits={splits} must divide the "
                          f"K/64/blocks_per_step={steps} pipeline steps")
    return Grid(n_tiles, m_tiles, splits, steps // splits)


def store_transposed(acc: jax.Array, ref, interpret: bool) -> None:
    """ref [tile_m, 64] = acc.T for a WGMMA-layout acc [64, tile_m]: one scalar shared-memory
    store per element (Mosaic GPU lowers no register transpose; the epilogue only)."""
    if interpret:
        ref[...] = acc.T
        return

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, fa, ref):
        index = ir.IndexType.get()
        for (row, col), reg in zip(fa.layout.thread_idxs(fa.shape), fa.registers.flat):
            for e in range(fa.layout.vector_length):
                memref.store(vector.extract(reg, [], [e]), ref,
                             [arith.addi(col, mgpu.utils.c(e, index)), row])

    store(acc, ref)


def stream_matmul(streams: list[Stream], body: Callable, grid: Grid, tuning: MosaicMatmulTuning,
                  dtype: jnp.dtype, *, scratch_types: tuple = (), m: int | None = None,
                  interpret: bool = False) -> jax.Array:
    """Launch the kernel: partial y [splits, M_tiles * tile_m, N_tiles * ROWS], float32 when
    split, else in x's `dtype`. `body(*step_smem_refs, acc, *scratch)` converts one step's
    weights, issues its wgmmas and returns the next float32 [64, tile_m] register accumulator.
    `m`: x's real rows; with one x tile only they are written (the other rows stay undefined)."""
    tile_m, n_streams = tuning.tile_m, len(streams)
    out_dtype = jnp.float32 if grid.splits > 1 else dtype
    rows_out = min(m, tile_m) if m is not None and grid.m_tiles == 1 else tile_m

    def kernel(*refs):
        gmem = refs[:n_streams]
        out_gmem, o_smem, *scratch = refs[n_streams:]
        j = lax.axis_index("mk")
        m_idx, s_idx = j // grid.splits, j % grid.splits
        rows = pl.ds(lax.axis_index("n") * ROWS, ROWS)
        cols = pl.ds(m_idx * tile_m, tile_m)

        views = [s.view(g, rows, cols, s_idx) for s, g in zip(streams, gmem)]
        pipeline = functools.partial(plgpu.emit_pipeline, grid=(grid.steps,),
                                     in_specs=[s.spec for s in streams],
                                     max_concurrent_steps=tuning.max_concurrent_steps)
        zeros = plgpu.layout_cast(jnp.zeros((ROWS, tile_m), jnp.float32), plgpu.Layout.WGMMA)
        acc = pipeline(lambda _, *refs: body(*refs[:-1], refs[-1], *scratch),
                       init_carry=zeros)(*views)
        store_transposed(acc.astype(o_smem.dtype), o_smem, interpret)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows_out)],
                                out_gmem.at[s_idx, pl.ds(m_idx * tile_m, rows_out), rows])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(
            (grid.splits, grid.m_tiles * tile_m, grid.n_tiles * ROWS), out_dtype),
        grid=(grid.n_tiles, grid.m_tiles * grid.splits),
        grid_names=("n", "mk"),
        scratch_types=[plgpu.SMEM((tile_m, ROWS), out_dtype), *scratch_types],
        compiler_params=compiler_params(tuning.profile_dir),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )
    return call(*(s.array for s in streams))


def finish_output(out: jax.Array, n: int, m: int, dtype: jnp.dtype) -> jax.Array:
    """Partial y [splits, Mp, Np] -> y [m, n] in dtype (split-K summed in float32)."""
    out = out[:, :m, :n]
    return (out[0] if out.shape[0] == 1 else out.sum(axis=0)).astype(dtype)


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


def _step_body(bps: int, tile_m: int, use_asm: bool):
    """One pipeline step: the codes (`_decoded`), xe/xo [tile_m, bps*32], scales^T [bps, 64] in
    shared memory. Each block's unscaled wgmmas go to their own zeroed accumulator; after the
    wait, total += absmax * partial (float32), total being the register accumulator the K loop
    carries."""
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


def nf4_mosaic_forward(x: jax.Array, codes: jax.Array, scales: jax.Array, n: int,
                       tuning: MosaicMatmulTuning, interpret: bool) -> jax.Array:
    """The forward alone: x [M, K] bf16, codes uint8 [N, K/2], block scales f32 [N, K/64] ->
    y [M, N] in x.dtype. `interpret`: Mosaic GPU's CPU interpreter, with a jnp select tree
    instead of the inline PTX."""
    m, k = x.shape
    if k % 64:
        raise KernelError(f"nf4_matmul_mosaic: K={k} must be a multiple of 64 (the NF4 block)")
    if x.dtype != jnp.bfloat16:
        raise KernelError(f"nf4_matmul_mosaic: x.dtype={x.dtype} must be bfloat16 (wgmma "
                          f"operand)")
    tile_m, bps = tuning.tile_m, tuning.blocks_per_step
    xp = pad_axis(x, 0, tile_m)
    xe, xo = xp[:, 0::2], xp[:, 1::2]
    if not interpret:  # the GPU decode's column order (`_decode_rows`)
        xe, xo = permute_x_planes(xe), permute_x_planes(xo)
    codes = pad_axis(codes, 0, ROWS)
    scales_t = pad_axis(scales, 0, ROWS).T                       # [K/64, Np]
    grid = plan(codes.shape[0], xp.shape[0], k // 64, tuning)
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
    out = stream_matmul(streams, _step_body(bps, tile_m, not interpret), grid, tuning, x.dtype,
                        scratch_types=scratch, m=m, interpret=interpret)
    return finish_output(out, n, m, x.dtype)


def _mosaic_forward(x: jax.Array, w: QTensor, *, tuning: MosaicMatmulTuning,
                    interpret: bool) -> jax.Array:
    codes, scales = nf4_operands(w)
    return nf4_mosaic_forward(x, codes, scales, w.shape[0], tuning, interpret)


def nf4_matmul_mosaic(x: jax.Array, w: QTensor, *, tuning: MosaicMatmulTuning | None = None,
                      dx_tuning: TritonMatmulTuning | None = None,
                      interpret: bool | None = None) -> jax.Array:
    """y = x [M, K] (bf16, M <= 64) @ dequantize(w [N, K]).T -> [M, N] by the Mosaic GPU
    forward, with `nf4_matmul.py`'s Triton dx kernel as its backward (w frozen). Tunings default
    to the measured ones (`MosaicMatmulTuning.for_m`, `TritonMatmulTuning.for_nf4_dx`)."""
    check_x(x, w, "nf4_matmul_mosaic")
    m, k = x.shape
    if m > MAX_M:
        raise KernelError(f"nf4_matmul_mosaic: M={m} rows of x; this decode kernel takes "
                          f"M <= {MAX_M}. Use ops.linear for more rows")
    interpret = interpreted() if interpret is None else interpret
    forward = functools.partial(_mosaic_forward, tuning=tuning or MosaicMatmulTuning.for_m(m, k),
                                interpret=interpret)
    return nf4_with_dx_kernel(x, w, forward, dx_tuning or TritonMatmulTuning.for_nf4_dx(),
                              interpret)
