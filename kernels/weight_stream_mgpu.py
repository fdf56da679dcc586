"""Skeleton of the Hopper weight-only quantized matmuls (NF4, int8) on Mosaic GPU.

y [M, N] = x [M, K] @ W[N, K]^T is computed transposed, y^T = W x^T, so the converted weight
(ROWS = 64 rows per CTA, one warpgroup) is wgmma's A operand, which may live in registers, and
x^T its B operand in shared memory (wgmma's N = tile_m, 8..256: decode M = 1..16 and training
M use the same kernel). The grid is (N / 64, M / tile_m * splits): each CTA streams its rows'
share of K (K / splits) through a TMA pipeline `depth` steps deep and leaves a float32 partial
y tile: its accumulator y^T is stored transposed into shared memory (`store_transposed`), so
only x's real rows are copied out (at decode, M = 1 of the tile's 8: an eighth of the partials'
bytes) and XLA sums the split-K partials and casts without a transpose (`finish_output`).

A kernel supplies its `Stream`s (the arrays to pipeline, each with the CTA's view of it and the
per-step block), a `body(*step_smem_refs, acc, *scratch)` that converts the step's weights and
issues its wgmmas, and optionally an `epilogue(acc, rows, *extra_gmem_refs)` applied to the CTA's
accumulator before it is stored (int8's per-row scale). The accumulator `acc` is either one wgmma
accumulator ref for the whole K loop (the body issues into it and waits), or, with
`register_acc=True`, a float32 [64, tile_m] value in registers carried across the steps (the body
returns the next one: NF4's decode scales each block's partial product there).

A persistent launch (a few hundred CTAs, each one pipeline across several work items) was tried
and measured slower on the H200 (NF4 decode M=1: 22.5-27.6 µs against 20.0 for one CTA per item;
benchmarks/RESULTS.md, sixth session), so each work item has its own CTA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, vector

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.mgpu_profile import compiler_params

ROWS = 64  # weight rows per CTA: wgmma's M
# CTAs the default split-K aims for: 8 per SM of a 132-SM H100/H200. Each CTA is one warpgroup
# of 46-96 registers per thread, so residency is bounded by the grid, not by registers: on the
# H200 at K=4096 N=14336, M=1 (NF4), splits 8 (1792 CTAs) ran the kernel in 22.0 us, splits 4 in
# 22.7, splits 2 (the old target of 2 per SM) in 25.8 (2026-11-29, GPU time from a trace).
TARGET_CTAS = 1056


@dataclasses.dataclass(frozen=True)
class MgpuTuning:
    """tile_m: x rows per CTA (wgmma's N: a multiple of 8, <= 256); max_concurrent_steps: TMA
    pipeline depth; splits: split-K factor (None: `default_splits`, 8 CTAs per SM of 132);
    blocks_per_step: 64-column weight blocks per pipeline step (1, 2, 4 or 8; for NF4 one block
    is one quantization block; K/64 must be a multiple of blocks_per_step * splits);
    acc_scale: NF4 only: multiply each block's float32 partial product by its absmax (one FMA
    per accumulator element) instead of multiplying the decoded weights (one per weight pair);
    needs blocks_per_step partial accumulators of 64 x tile_m, so it is for decode tiles;
    profile_dir: Mosaic GPU's in-kernel profiler writes a trace of the named regions per launch
    there ("" = off)."""

    tile_m: int = 16
    max_concurrent_steps: int = 4
    splits: int | None = None
    blocks_per_step: int = 1
    acc_scale: bool = False
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
        if self.acc_scale and self.tile_m * self.blocks_per_step > 64:
            raise KernelError(f"MgpuTuning.acc_scale needs tile_m * blocks_per_step <= 64 "
                              f"(registers of the partial accumulators), got {self.tile_m} * "
                              f"{self.blocks_per_step}")


def tile_for(m: int) -> int:
    """The tile_m for M rows of x: M rounded up to a multiple of 8, within wgmma's [8, 256]."""
    return min(256, max(8, -(-m // 8) * 8))


def default_splits(ctas: int, steps: int) -> int:
    """Power-of-two split of the K steps until the grid holds >= TARGET_CTAS CTAs."""
    splits = 1
    while ctas * splits < TARGET_CTAS and steps % (2 * splits) == 0 and splits < 16:
        splits *= 2
    return splits


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


def plan(name: str, n_rows: int, m_rows: int, k_blocks: int, tuning: MgpuTuning) -> Grid:
    """The grid of a call: n_rows / m_rows already padded to ROWS / tile_m; k_blocks = K / 64."""
    bps = tuning.blocks_per_step
    if k_blocks % bps:
        raise KernelError(f"{name}: blocks_per_step={bps} must divide K/64={k_blocks}")
    steps = k_blocks // bps
    n_tiles, m_tiles = n_rows // ROWS, m_rows // tuning.tile_m
    splits = tuning.splits or default_splits(n_tiles * m_tiles, steps)
    if steps % splits:
        raise KernelError(f"{name}: splits={splits} must divide the K/64/blocks_per_step={steps} "
                          f"pipeline steps")
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


def stream_matmul(streams: list[Stream], body: Callable, grid: Grid, tuning: MgpuTuning,
                  dtype: jnp.dtype, *, scratch_types: tuple = (),
                  epilogue: Callable | None = None, extra: tuple = (),
                  register_acc: bool = False, m: int | None = None,
                  interpret: bool = False) -> jax.Array:
    """Launch the kernel: partial y [splits, M_tiles * tile_m, N_tiles * ROWS], float32 when
    split, else in x's `dtype`. `extra`: GMEM arrays handed to the epilogue. `register_acc`: the
    body gets and returns a register accumulator instead of a wgmma accumulator ref. `m`: x's
    real rows; with one x tile only they are written (the other rows stay undefined)."""
    tile_m, n_streams = tuning.tile_m, len(streams)
    out_dtype = jnp.float32 if grid.splits > 1 else dtype
    rows_out = min(m, tile_m) if m is not None and grid.m_tiles == 1 else tile_m

    def kernel(*refs):
        gmem, extra_refs = refs[:n_streams], refs[n_streams:n_streams + len(extra)]
        out_gmem, o_smem, *scratch = refs[n_streams + len(extra):]
        j = lax.axis_index("mk")
        m_idx, s_idx = j // grid.splits, j % grid.splits
        rows = pl.ds(lax.axis_index("n") * ROWS, ROWS)
        cols = pl.ds(m_idx * tile_m, tile_m)

        views = [s.view(g, rows, cols, s_idx) for s, g in zip(streams, gmem)]
        pipeline = functools.partial(plgpu.emit_pipeline, grid=(grid.steps,),
                                     in_specs=[s.spec for s in streams],
                                     max_concurrent_steps=tuning.max_concurrent_steps)
        if register_acc:
            zeros = plgpu.layout_cast(jnp.zeros((ROWS, tile_m), jnp.float32), plgpu.Layout.WGMMA)
            acc = pipeline(lambda _, *refs: body(*refs[:-1], refs[-1], *scratch),
                           init_carry=zeros)(*views)
        else:
            def run(acc_ref):
                pipeline(lambda _, *step_refs: body(*step_refs, acc_ref, *scratch))(*views)
                return acc_ref[...]

            acc = pl.run_scoped(run, plgpu.ACC((ROWS, tile_m), jnp.float32))
        if epilogue is not None:
            acc = epilogue(acc, rows, *extra_refs)
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
    return call(*(s.array for s in streams), *extra)


def finish_output(out: jax.Array, n: int, m: int, dtype: jnp.dtype) -> jax.Array:
    """Partial y [splits, Mp, Np] -> y [m, n] in dtype (split-K summed in float32)."""
    out = out[:, :m, :n]
    return (out[0] if out.shape[0] == 1 else out.sum(axis=0)).astype(dtype)
