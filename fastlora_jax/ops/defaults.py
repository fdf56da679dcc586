"""What runs when nobody chooses: every measured default of `ops` and of the kernels, in one table.

Each line names the benchmark row it rests on: a JSON under benchmarks/results/ and the row's
`case` (NVIDIA H200, jax 0.11.2 unless said otherwise). The tables of those runs, with the
alternatives they beat, are in benchmarks/RESULTS.md; docs/kernels.md explains the rules. A
tuning dataclass's `for_*` constructor reads its numbers here; `ops.attention` and `ops.linear`
read the rules.
"""

from __future__ import annotations

import jax.numpy as jnp

from fastlora_jax.ops.impl import Impl
from fastlora_jax.quant import QuantKind

# ---- attention ----------------------------------------------------------------------------------
# GPU, neither segment ids nor softcap: cuDNN where it takes the call (`cudnn_takes`), else
# XLA's attention. Ours reached 0.84-0.98x of it fwd+bwd causal at
# 2K-16K (attention-2026-11-29-all.json, "causal_gqa32/8_d128_s2048" .. "_s16384") and 0.89x
# with a sliding window alone, which cuDNN takes as local_window_size ("window4096_s16384").
# Segment ids: ours, 10.7x cuDNN's dense [T, T] mask fwd+bwd ("packed_8docs_s4096", same file).
# Softcap: ours (cuDNN has none; the alternative is the O(T^2) reference).
# CPU: XLA, i.e. kernels/attention_dense.py: the SmolLM2-135M LoRA step 1.11x the reference's
# (cpu_train_step, RESULTS.md; 24 vs 64 ms fwd+bwd per layer at 4 x 256 tokens, 9/3 heads).
# Ours on Hopper: the Mosaic GPU kernels, 1.7-1.8x the Triton ones fwd+bwd
# (attention-2026-11-28.json, "causal_gqa32/8_d128_s*": mosaic_gpu vs triton columns).


# ---- loss -------------------------------------------------------------------------------------
def loss_grad_in_forward(*, gpu: bool) -> bool:
    """Whether the chunked cross-entropy computes its gradients in the forward (`train/loss.py`).
    CPU: yes, two lm_head GEMMs per chunk instead of three (cpu_train_step, RESULTS.md). GPU: the
    rematerialised chunk, as measured so far."""
    return not gpu


def cudnn_takes(*, dtype: object, head_dim: int, q_len: int, kv_len: int, hopper: bool) -> bool:
    """Whether cuDNN's fused attention (through jax.nn.dot_product_attention) accepts a call:
    16-bit inputs, head_dim a multiple of 8 up to 256 (Hopper) or 128, and even lengths (its
    masked training kernels refuse odd ones: a CLIP tower's 577 tokens, the class token and
    24 x 24 patches, would raise there)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= (256 if hopper else 128)
            and q_len % 2 == 0 and kv_len % 2 == 0)


def attention_impl(*, gpu: bool, hopper: bool, segments: bool, softcap: bool,
                   cudnn_fits: bool = True) -> Impl:
    """The default implementation of `ops.attention` for one call. `cudnn_fits`: `cudnn_takes`
    of the call; where cuDNN refuses it, XLA's attention (any dtype and length) runs instead."""
    if not gpu:
        return Impl.XLA
    if segments or softcap:
        return Impl.PALLAS_MOSAIC if hopper else Impl.PALLAS_TRITON
    return Impl.CUDNN if cudnn_fits else Impl.XLA


def cached_attention_impl() -> Impl:
    """The default of `ops.cached_attention` (decode over a KV cache): the grouped XLA form on
    every platform; no kernel of ours exists for it."""
    return Impl.XLA


def flash_attention_impl(*, hopper: bool) -> Impl:
    """The default backend of `kernels.flash_attention` (CPU: the Triton kernels, interpreted)."""
    return Impl.PALLAS_MOSAIC if hopper else Impl.PALLAS_TRITON


# Triton-backend tiles per head_dim (up to the key): the H200 tile sweep of commit 348e250 (its
# JSON was not kept; benchmarks/attention.py --sweep pallas_triton repeats it).
TRITON_ATTENTION_BLOCKS = {
    64: dict(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=32, block_q_dkv=32,
             block_kv_dkv=64, num_warps=4, num_warps_bwd=4, num_stages=3, num_stages_bwd=2),
    128: dict(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=32, block_q_dkv=32,
              block_kv_dkv=64, num_warps=8, num_warps_bwd=4, num_stages=3, num_stages_bwd=2),
    256: dict(block_q=64, block_kv=32, block_q_dq=32, block_kv_dq=32, block_q_dkv=32,
              block_kv_dkv=32, num_warps=4, num_warps_bwd=4, num_stages=2, num_stages_bwd=2),
}
# Mosaic GPU tiles (rows per compute warpgroup, two per CTA) per head_dim (up to the key). The
# 3-slot backward ring: attention-2026-11-29-rev.json, "causal_gqa32/8_d128_s*", column
# ours:mosaic_gpu+rev+s3 (+1-3% fwd+bwd). head_dim 256: 64-key blocks, so the forward's K/V
# ring fits shared memory (its backward runs the Triton kernels: no Mosaic backward fits).
MOSAIC_ATTENTION_BLOCKS = {
    128: dict(block_q=64, block_kv=128, num_stages=2, block_q_bwd=64, block_kv_bwd=64,
              num_stages_bwd=3),
    256: dict(block_q=64, block_kv=64, num_stages=2, block_q_bwd=64, block_kv_bwd=64,
              num_stages_bwd=2),
}


def up_to(table: dict[int, object], value: int):
    """The entry of `table` for `value`: the one under the smallest key >= value."""
    return table[min(key for key in table if key >= value)]


# ---- quantized linear (ops.linear with a QTensor weight) ---------------------------------------
# Our fused dequantize-matmul forward up to this many rows (tokens) of x, XLA's
# dequantize-then-dot above. NF4: 3.0-3.1x XLA at M = 1, 16, 64 (nf4_matmul-2026-11-29.json,
# "nf4 M=1 K=4096 N=14336 fwd" .. "M=64"), 0.49-0.72x at M = 2048 (same file, "nf4 M=2048 ...
# fwd"). int8: 1.8-3.5x at M <= 64 (nf4_matmul-2026-11-28.json, "int8 M=1 K=4096 N=14336 fwd"
# .. "M=64"), 0.64-0.68x at M = 8192 ("int8 M=8192 K=4096 N=14336 fwd").
FUSED_MAX_M = {QuantKind.NF4: 64, QuantKind.INT8: 64}
# dx behind a fused forward: NF4's dx kernel, 1.17-1.33x XLA at M <= 64 (nf4_matmul-2026-11-29.json,
# "nf4 M=1 K=4096 N=14336 bwd" .. "M=64"); int8 has none: its kernel lost, 0.87-0.93x
# (nf4_matmul-2026-11-28.json, "int8 M=1 K=4096 N=14336 bwd" .. "M=64"), so XLA's runs.
# NF4 forward on Hopper with bf16 x up to this M: the Mosaic GPU kernel, 20.0 / 22.1 us kernel
# time at M = 1 / 16 against 35.6 / 32.2 for the Triton one (nf4_matmul-2026-11-29-decode-nf4.json,
# "nf4 M=1 K=4096 N=14336 fwd, GPU time", "nf4 M=16 ..."); slower than Triton at M = 64
# (nf4_matmul-2026-11-29-mgpu.json, "nf4 M=64 K=4096 N=14336 fwd").
MOSAIC_NF4_MAX_M = 16
# NF4 with bf16 / fp16 x beyond the fused kernels, up to this M: our dequantization kernel, then
# XLA's GEMM (forward and dx), 1.14-1.45x XLA's dequantize-then-dot at M = 2048 on all 8 rows
# (nf4_matmul-2026-11-29-dequant.json, "nf4 M=2048 ... ours_dequant+dot"); mixed at M = 8192
# (0.77-1.39x, "nf4 M=8192 ... ours_dequant+dot"), so XLA's stays there.
DEQUANT_MAX_M = 2048

# Triton tiles (block_m, block_n, block_k, num_warps, num_stages) of the fused kernels, best of
# each sweep: NF4 decode forward at M = 1 and M <= 16 / M <= 64 (nf4_matmul-2026-11-29.json,
# "nf4 M=1 K=4096 N=14336 fwd", "M=16", "M=64": the rows' `tuning`); M = 1 runs the CUDA-core
# (FMA) variant of the decode kernel, larger M the tensor-core one.
NF4_TRITON_FORWARD = {1: (16, 64, 256, 4, 3), 16: (16, 64, 256, 4, 3), 64: (16, 128, 128, 4, 3)}
# NF4 dx: the tuning the GPU-time rows of nf4_matmul-2026-11-29-decode-dx.json timed ("nf4 M=1
# K=4096 N=14336 bwd, GPU time"); block_m shrinks to M.
NF4_TRITON_DX = (128, 64, 128, 8, 3)
# int8 forward at M <= 64 (nf4_matmul-2026-11-28.json, "int8 M=1 K=4096 N=14336 fwd" .. "M=64")
# and above, where only an explicit impl runs it ("int8 M=8192 K=4096 N=14336 fwd").
INT8_TRITON_FORWARD = (16, 64, 256, 4, 3)
INT8_TRITON_FORWARD_LARGE_M = (128, 128, 64, 8, 3)
# Split-K of the Triton NF4 decode: programs to aim at, 2 per SM of a 132-SM H100 / H200.
TRITON_SPLIT_PROGRAMS = 264
# The Mosaic NF4 decode: a 4-deep TMA pipeline of 4 quantization blocks per step (2 or 1 when K /
# 64 is not a multiple of 4), each block's absmax applied to its float32 partial product: 20.0 /
# 22.1 us at M = 1 / 16 against 21.1 / 23.1 with 2 blocks per step and 23.9 / 25.7 with 8
# (nf4_matmul-2026-11-29-decode-nf4.json, "nf4 M=1 K=4096 N=14336 fwd, GPU time" and its log).
MOSAIC_NF4_DEPTH = 4
MOSAIC_NF4_BLOCKS_PER_STEP = (4, 2, 1)
# Its split-K aims at 8 CTAs per SM of 132: 22.0 us at split-K 8 against 22.7 at 4 and 25.8 at 2
# (nf4_matmul-2026-11-29-decode-splits.json, log of "nf4 M=1 K=4096 N=14336").
MOSAIC_SPLIT_CTAS = 1056
# The dequantization kernel: 512 blocks of 64 weights per program, 8 warps (fastest exact tuning
# of nf4_matmul-2026-11-29-dequant.json, "nf4 dequant K=4096 N=14336 exact xla-absmax 512/8").
DEQUANT_BLOCKS = (512, 8)


def fused_applies(kind: QuantKind, blocksize: int, k: int) -> bool:
    """Whether the fused kernels take a weight of this kind with K columns (NF4: blocks of 64
    weights, K a whole number of them; int8: K % 16 == 0, the tensor-core tile)."""
    if kind is QuantKind.NF4:
        return blocksize == 64 and k % 64 == 0
    return k % 16 == 0


def dequant_applies(kind: QuantKind, blocksize: int, dtype: jnp.dtype) -> bool:
    """Whether the dequantization kernel takes it: NF4 with 64-weight blocks, bf16 / fp16 out."""
    return (kind is QuantKind.NF4 and blocksize == 64
            and jnp.dtype(dtype).name in ("bfloat16", "float16"))


def mosaic_applies(kind: QuantKind, blocksize: int, k: int, m: int, dtype: jnp.dtype) -> bool:
    """Whether the Mosaic NF4 forward takes x [m, K] of `dtype` (bf16: wgmma's operand)."""
    return (kind is QuantKind.NF4 and fused_applies(kind, blocksize, k)
            and m <= FUSED_MAX_M[kind] and jnp.dtype(dtype) == jnp.bfloat16)


def linear_impl(kind: QuantKind, blocksize: int, m: int, k: int, dtype: jnp.dtype, *, gpu: bool,
                hopper: bool) -> Impl:
    """The default implementation of `ops.linear` for x [m, K] of `dtype` and a quantized weight."""
    if not gpu:
        return Impl.XLA
    if hopper and m <= MOSAIC_NF4_MAX_M and mosaic_applies(kind, blocksize, k, m, dtype):
        return Impl.PALLAS_MOSAIC
    if m <= FUSED_MAX_M[kind] and fused_applies(kind, blocksize, k):
        return Impl.PALLAS_TRITON
    if m <= DEQUANT_MAX_M and dequant_applies(kind, blocksize, dtype):
        return Impl.PALLAS_TRITON
    return Impl.XLA
