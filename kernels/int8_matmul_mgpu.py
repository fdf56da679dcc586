"""Hopper int8 weight-only matmul on Mosaic GPU, on `weight_stream_mgpu.py`'s skeleton.

y [M, N] = x [M, K] @ (codes [N, K] * scale[:, None]).T, computed as y^T = codes x^T with the
codes converted in registers as wgmma's A operand. Per pipeline step (`blocks_per_step` blocks of
64 columns, TMA-fed) the warpgroup loads each [64, 64] int8 block from shared memory in wgmma's
register layout, converts it to bf16 (Mosaic's byte-permute conversion, 2 instructions per
weight, exact for |c| <= 127) and issues one wgmma against x's matching 64 columns; it waits once
per step. The per-row scale multiplies the float32 accumulator once, after the K loop (the
product is linear in the codes), so no multiply touches the weights.

At decode shapes this moves twice NF4's bytes per weight with about a seventh of its
instructions per byte, so it can run closer to the memory bandwidth than the NF4 kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_matmul_common import pad_axis
from fastlora_jax.kernels.weight_stream_mgpu import (ROWS, MgpuTuning, Stream, finish_output,
                                                     plan, stream_matmul, tile_for)

BLOCK = 64  # columns per converted block: one wgmma's K = 4 x 16
_X_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _body(bps: int, interpret: bool):
    """One pipeline step: codes [64, bps*64] int8 and x [tile_m, bps*64] bf16 in shared memory."""
    def body(c_smem, x_smem, acc_ref, a_smem=None):
        for b in range(bps):
            blk = pl.ds(b * BLOCK, BLOCK)
            with jax.named_scope("convert"):
                w = plgpu.load(c_smem.at[:, blk], layout=plgpu.Layout.WGMMA,
                               optimized=False).astype(jnp.bfloat16)
            if interpret:  # the interpreter's wgmma takes A from shared memory only
                a_smem[b] = w
                plgpu.commit_smem()
                w = a_smem.at[b]
            plgpu.wgmma(acc_ref, w, x_smem.at[:, blk].transpose((1, 0)))
        with jax.named_scope("wgmma_wait"):
            plgpu.wgmma_wait(0)

    return body


def _scale_rows(acc: jax.Array, rows, scale_gmem) -> jax.Array:
    """acc [64, tile_m] float32 times the CTA's 64 per-row scales."""
    s = plgpu.load(scale_gmem.at[rows], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
    return acc * lax.broadcast_in_dim(s, acc.shape, (0,))


def int8_matmul_mgpu(x: jax.Array, codes: jax.Array, scale: jax.Array, n: int,
                     tuning: MgpuTuning | None = None, interpret: bool = False) -> jax.Array:
    """x [M, K] bf16, codes int8 [N, K], scale float32 [N] -> y [M, N] in x.dtype.

    `interpret`: Mosaic GPU's CPU interpreter (A staged through shared memory).
    """
    m, k = x.shape
    if k % BLOCK:
        raise KernelError(f"int8_matmul_mgpu: K={k} must be a multiple of {BLOCK}; use the "
                          f"Triton-backend int8_matmul (K % 16 == 0) for this shape")
    if x.dtype != jnp.bfloat16:
        raise KernelError(f"int8_matmul_mgpu: x.dtype={x.dtype} must be bfloat16 (wgmma operand)")
    if codes.dtype != jnp.int8 or codes.shape != (n, k):
        raise KernelError(f"int8_matmul_mgpu: codes {codes.dtype}{list(codes.shape)} must be "
                          f"int8[{n}, {k}]")
    tuning = tuning or MgpuTuning(tile_m=tile_for(m))
    tile_m, bps = tuning.tile_m, tuning.blocks_per_step
    xp = pad_axis(x, 0, tile_m)
    codes = pad_axis(codes, 0, ROWS)
    scale = pad_axis(jnp.asarray(scale, jnp.float32).reshape(-1), 0, ROWS)
    grid = plan("int8_matmul_mgpu", codes.shape[0], xp.shape[0], k // BLOCK, tuning)
    kb = grid.steps * bps * BLOCK                                  # columns per CTA
    streams = [
        Stream(codes, lambda ref, rows, cols, s: ref.at[rows, pl.ds(s * kb, kb)],
               plgpu.BlockSpec((ROWS, bps * BLOCK), lambda t: (0, t))),
        Stream(xp, lambda ref, rows, cols, s: ref.at[cols, pl.ds(s * kb, kb)],
               plgpu.BlockSpec((tile_m, bps * BLOCK), lambda t: (0, t),
                               transforms=_X_TRANSFORMS)),
    ]
    scratch = ((plgpu.SMEM((bps, ROWS, BLOCK), jnp.bfloat16, transforms=_X_TRANSFORMS),)
               if interpret else ())
    out = stream_matmul(streams, _body(bps, interpret), grid, tuning,
                        x.dtype, scratch_types=scratch,
                        epilogue=_scale_rows, extra=(scale,), m=m, interpret=interpret)
    return finish_output(out, n, m, x.dtype)
