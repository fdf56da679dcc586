"""Flash attention for training: the public op (jax.custom_vjp), its tuning dataclass and dispatch.

Shapes: q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim] with
heads % kv_heads == 0 (GQA/MQA: query head h reads kv head h // (heads // kv_heads); K/V are never
repeated in memory). Output: q's shape and dtype. Semantics are exactly those of
`attention_reference.flash_attention_reference` (causal mask aligned bottom-right, sliding window,
segment ids, logit soft-capping, custom scale); accumulation in float32.

Packed sequences: `segment_ids` [batch, seq_q] (kv_segment_ids defaults to it) restrict attention
to tokens of the same segment. The causal and window masks use the token index inside the row; for
contiguous packing that is the same as the per-token position inside each document (positions
restart at 0 in each segment, and both the index and the position grow by one per token), so the
positions used for RoPE need not be passed here.

Kernels: `flash_attention_portable.py` (Pallas, Triton-backend lowering on any CUDA GPU, and
`interpret` on CPU) and, on Hopper, `flash_attention_mgpu.py` / `flash_attention_mgpu_bwd.py`
(Mosaic GPU: TMA, wgmma, warp specialisation) where they support the call. Whole blocks that the mask hides (above the causal diagonal, outside
the window, crossing packed documents: per-block min/max segment ids) are never loaded.
Memory is O(seq): residuals are the output and a float32 log-sum-exp per query row.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math

import jax
import jax.numpy as jnp

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels import flash_attention_mgpu as mgpu
from fastlora_jax.kernels import flash_attention_mgpu_bwd as mgpu_bwd
from fastlora_jax.kernels import flash_attention_mgpu_fused as mgpu_fused
from fastlora_jax.kernels import flash_attention_portable as portable
from fastlora_jax.kernels.attention_reference import flash_attention_reference

__all__ = ["Backend", "BlockSizes", "default_backend", "flash_attention",
           "flash_attention_reference"]

_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MAX_HEAD_DIM = 256


class Backend(enum.Enum):
    """Which lowering runs the kernels (`None`: see `flash_attention`'s docstring)."""

    TRITON = "triton"          # portable Pallas kernels, Triton-backend lowering (any CUDA GPU)
    MOSAIC_GPU = "mosaic_gpu"  # Hopper: Mosaic GPU kernels where supported, else as TRITON
    INTERPRET = "interpret"    # the portable kernels, interpreted (CPU tests)
    MOSAIC_INTERPRET = "mosaic_interpret"  # MOSAIC_GPU's kernels, interpreted (CPU tests)

    @property
    def interpreted(self) -> bool:
        return self in (Backend.INTERPRET, Backend.MOSAIC_INTERPRET)

    @property
    def mosaic(self) -> bool:
        return self in (Backend.MOSAIC_GPU, Backend.MOSAIC_INTERPRET)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (rows of the sequence per program) and launch parameters of the three kernels.

    block_q / block_kv: forward tiles; *_dq: the dq kernel; *_dkv: the dk/dv kernel.
    mgpu_*: the Mosaic GPU kernels (block_q rows per compute warpgroup, two per CTA; a TMA ring of
    mgpu_num_stages slots; the backward's ring: mgpu_num_stages_bwd, None = the same);
    mgpu_backward=False keeps the portable backward behind the Mosaic forward;
    mgpu_segments=True lets the Mosaic kernels take segment ids (False: packed batches use the
    portable kernels; True measured 1.4-1.6x faster on the H200's packed benchmark);
    mgpu_fused_bwd=True runs the Mosaic backward as one kernel (dk/dv per key block, dq
    reduce-added in float32 by TMA: 5 matmuls per block pair instead of 7; correct on the H200
    but slower than the two-kernel backward, 0.78-0.90x fwd+bwd: off by default);
    mgpu_fused_pair_dq=True (with it, head_dim 128) has its two compute warpgroups form one dq
    product over both key blocks, each taking half the columns: half the reduce-add traffic.
    mgpu_pingpong=True has the forward's two compute warpgroups take turns on the tensor cores
    (FA3's schedule: one's softmax overlaps the other's matmuls; +7-11% forward on the H200);
    mgpu_dkv_group=True has the dk/dv kernel sum over each kv head's group of query heads in
    registers (one CTA per kv head) instead of writing per-query-head dk/dv and summing after
    (no per-head buffer; group times fewer CTAs);
    mgpu_reverse_tiles=True launches the forward's and the dq kernel's query tiles last-first
    (under a causal mask the heaviest first: a shorter tail of the grid). With a 3-slot backward
    ring (for_head_dim's mgpu_num_stages_bwd at head_dim <= 128) +1-3% fwd+bwd on the H200;
    mgpu_bwd_overlap=True has the backward kernels (two-kernel and fused) issue the do/v product
    before computing the probabilities, so the exponentials overlap the tensor cores
    (H200, 2026-11-29: 11-13 % slower fwd+bwd at 2K-4K: off by default);
    mgpu_bwd_stats_tma=True streams lse and delta through the TMA ring of the dk/dv (or fused)
    kernel instead of loading them from global memory every step (H200: -4 to +7 %, within
    noise: off by default);
    mgpu_profile_dir="DIR" turns on Mosaic GPU's in-kernel profiler: every Mosaic kernel launch
    writes a trace of its named regions per warpgroup to DIR (benchmarks/mgpu_trace.py).
    Every block is a power of two >= 16 (mgpu blocks: multiples of 64); num_warps a power of two
    in [1, 16]; stages >= 1. Portable blocks larger than the (padded) sequence are shrunk to it.
    """

    block_q: int = 128
    block_kv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 2
    num_stages_bwd: int = 2
    mgpu_block_q: int = 64
    mgpu_block_kv: int = 128
    mgpu_num_stages: int = 2
    mgpu_num_stages_bwd: int | None = None
    mgpu_block_q_bwd: int = 64
    mgpu_block_kv_bwd: int = 64
    mgpu_backward: bool = True
    mgpu_segments: bool = True
    mgpu_fused_bwd: bool = False
    mgpu_fused_pair_dq: bool = False
    mgpu_pingpong: bool = True
    mgpu_dkv_group: bool = True
    mgpu_reverse_tiles: bool = True
    mgpu_bwd_overlap: bool = False
    mgpu_bwd_stats_tma: bool = False
    mgpu_profile_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("mgpu_backward", "mgpu_segments", "mgpu_fused_bwd", "mgpu_fused_pair_dq",
                     "mgpu_pingpong", "mgpu_dkv_group", "mgpu_reverse_tiles",
                     "mgpu_bwd_overlap", "mgpu_bwd_stats_tma"):
            if not isinstance(getattr(self, name), bool):
                raise KernelError(f"BlockSizes.{name}={getattr(self, name)!r} must be a bool")
        for name in ("mgpu_block_q", "mgpu_block_kv", "mgpu_block_q_bwd", "mgpu_block_kv_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 64:
                raise KernelError(f"BlockSizes.{name}={value!r} must be a positive multiple of 64")
        for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv",
                     "block_kv_dkv"):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_pow2(value) or value < 16:
                raise KernelError(f"BlockSizes.{name}={value!r} must be a power of two >= 16")
        for name in ("num_warps", "num_warps_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_pow2(value) or value > 16:
                raise KernelError(f"BlockSizes.{name}={value!r} must be a power of two in [1, 16]")
        for name in ("num_stages", "num_stages_bwd", "mgpu_num_stages", "mgpu_num_stages_bwd"):
            value = getattr(self, name)
            if value is None and name == "mgpu_num_stages_bwd":
                continue
            if not isinstance(value, int) or value < 1:
                raise KernelError(f"BlockSizes.{name}={value!r} must be an int >= 1")

    @classmethod
    def for_head_dim(cls, head_dim: int) -> BlockSizes:
        """Defaults for this head_dim (64, 128 or 256), from the H200 sweep in benchmarks/."""
        if head_dim <= 128:
            return cls(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=32, block_q_dkv=32,
                       block_kv_dkv=64, num_warps=8 if head_dim > 64 else 4, num_warps_bwd=4,
                       num_stages=3, num_stages_bwd=2, mgpu_num_stages_bwd=3)
        return cls(block_q=64, block_kv=32, block_q_dq=32, block_kv_dq=32, block_q_dkv=32,
                   block_kv_dkv=32, num_warps=4, num_warps_bwd=4, num_stages=2, num_stages_bwd=2,
                   mgpu_block_q=64, mgpu_block_kv=64, mgpu_num_stages=2)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: a nondiff argument of the custom_vjp)."""

    spec: portable.MaskSpec
    scale: float
    softcap: float | None
    blocks: BlockSizes
    backend: Backend
    use_mgpu: bool  # the forward runs the Mosaic GPU kernel
    use_mgpu_bwd: bool  # the backward runs the Mosaic GPU kernels


def _check(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
           kv_segment_ids: jax.Array | None, sliding_window: int | None,
           softcap: float | None, scale: float | None) -> None:
    """Raise KernelError naming the offending value when the call is unsupported."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise KernelError(f"q, k, v must be 4-D [batch, seq, heads, head_dim]; got {q.shape=}, "
                          f"{k.shape=}, {v.shape=}")
    batch, seq_q, heads, head_dim = q.shape
    if k.shape != v.shape:
        raise KernelError(f"k and v must have the same shape; got {k.shape=} and {v.shape=}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise KernelError(f"k must be [batch={batch}, seq_kv, kv_heads, head_dim={head_dim}]; "
                          f"got {k.shape=}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise KernelError(f"{heads=} must be a multiple of {kv_heads=}")
    if head_dim > _MAX_HEAD_DIM or head_dim < 1:
        raise KernelError(f"{head_dim=} must be in [1, {_MAX_HEAD_DIM}]")
    if seq_q == 0 or k.shape[1] == 0:
        raise KernelError(f"sequence lengths must be positive; got {seq_q=}, seq_kv={k.shape[1]}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelError(f"q, k, v must share one dtype of bfloat16/float16/float32; got "
                          f"{q.dtype=}, {k.dtype=}, {v.dtype=}")
    for name, seg, length in (("segment_ids", segment_ids, seq_q),
                              ("kv_segment_ids", kv_segment_ids, k.shape[1])):
        if seg is None:
            continue
        if seg.shape != (batch, length):
            raise KernelError(f"{name}.shape={seg.shape} must be (batch, seq)=({batch}, {length})")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise KernelError(f"{name}.dtype={seg.dtype} must be an integer type")
    if kv_segment_ids is not None and segment_ids is None:
        raise KernelError("kv_segment_ids given without segment_ids; pass both or neither")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelError(f"{sliding_window=} must be a positive int or None")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise KernelError(f"{softcap=} must be a positive number or None")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise KernelError(f"{scale=} must be a finite number or None")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit(block: int, seq: int) -> int:
    """Shrink a block to the sequence (power of two >= 16)."""
    return min(block, max(16, 1 << (seq - 1).bit_length()))


def _block_visibility(spec: portable.MaskSpec, block_q: int, block_kv: int, seq_q_pad: int,
                      seq_kv_pad: int, q_seg: jax.Array | None, kv_seg: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array]:
    """Per block pair (i, j): (any pair visible, every pair visible), bool [batch or 1, nq, nk].

    Padded query rows count as visible (their outputs are dropped and their gradients are zero);
    padded keys as invisible. Size O((seq / block)^2) booleans: a few hundred thousand at 65,536.
    """
    nq, nk = seq_q_pad // block_q, seq_kv_pad // block_kv
    r0 = jnp.arange(nq) * block_q                       # first row of each query block
    r1 = jnp.minimum(r0 + block_q, spec.seq_q) - 1      # last real row
    c0 = jnp.arange(nk) * block_kv
    c1 = c0 + block_kv - 1
    any_ = (r0 < spec.seq_q)[:, None] & (c0 < spec.seq_kv)[None, :]
    all_ = any_ & (c1 < spec.seq_kv)[None, :]
    if spec.causal:  # some key at or before the last row's position / all before the first row's
        any_ &= c0[None, :] <= (r1 + spec.offset)[:, None]
        all_ &= c1[None, :] <= (r0 + spec.offset)[:, None]
    if spec.sliding_window is not None:  # some key / every key inside the window
        any_ &= jnp.minimum(c1, spec.seq_kv - 1)[None, :] > (
            r0 + spec.offset - spec.sliding_window)[:, None]
        all_ &= c0[None, :] > (r1 + spec.offset - spec.sliding_window)[:, None]
    any_, all_ = any_[None], all_[None]
    if q_seg is not None:
        big = jnp.iinfo(jnp.int32).max
        real_q = (jnp.arange(seq_q_pad) < spec.seq_q)[None, :]
        real_k = (jnp.arange(seq_kv_pad) < spec.seq_kv)[None, :]
        qb = lambda x: x.reshape(x.shape[0], nq, block_q)
        kb = lambda x: x.reshape(x.shape[0], nk, block_kv)
        q_min = qb(jnp.where(real_q, q_seg, big)).min(-1)[:, :, None]
        q_max = qb(jnp.where(real_q, q_seg, -big)).max(-1)[:, :, None]
        k_min = kb(jnp.where(real_k, kv_seg, big)).min(-1)[:, None, :]
        k_max = kb(jnp.where(real_k, kv_seg, -big)).max(-1)[:, None, :]
        any_ = any_ & (k_max >= q_min) & (k_min <= q_max)
        all_ = all_ & (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    return any_, all_


def _ranges(any_: jax.Array, all_: jax.Array) -> jax.Array:
    """(lo, full_lo, full_hi, hi) along the last axis: int32 [B, 4, n].

    [lo, hi) spans the True entries of `any_`; [full_lo, full_hi) is the span of `all_` when that
    span is entirely True (it always is for causal / window / sorted segments), else empty.
    """
    def span(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        n = x.shape[-1]
        has = x.any(-1)
        lo = jnp.where(has, jnp.argmax(x, axis=-1), 0)
        hi = jnp.where(has, n - jnp.argmax(x[..., ::-1], axis=-1), 0)
        return lo, hi

    lo, hi = span(any_)
    full_lo, full_hi = span(all_)
    usable = (all_.sum(-1) == full_hi - full_lo) & (full_hi > full_lo)
    full_lo, full_hi = jnp.where(usable, full_lo, lo), jnp.where(usable, full_hi, lo)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=1).astype(jnp.int32)


def _fwd_impl(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
              kv_seg: jax.Array | None, r_fwd: jax.Array, cfg: _Config
              ) -> tuple[jax.Array, jax.Array]:
    b = cfg.blocks
    if cfg.use_mgpu:
        return mgpu.forward(q, k, v, r_fwd, q_seg, kv_seg, spec=cfg.spec, scale=cfg.scale,
                            softcap=cfg.softcap,
                            block_q=b.mgpu_block_q, block_kv=b.mgpu_block_kv,
                            num_stages=b.mgpu_num_stages, pingpong=b.mgpu_pingpong,
                            reverse_tiles=b.mgpu_reverse_tiles,
                            interpret=cfg.backend is Backend.MOSAIC_INTERPRET,
                            profile_dir=b.mgpu_profile_dir)
    return portable.forward(q, k, v, q_seg, kv_seg, r_fwd, spec=cfg.spec, scale=cfg.scale,
                            softcap=cfg.softcap, block_q=b.block_q, block_kv=b.block_kv,
                            num_warps=b.num_warps, num_stages=b.num_stages,
                            interpret=cfg.backend.interpreted)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
           kv_seg: jax.Array | None, r_fwd: jax.Array, r_dq: jax.Array, r_dkv: jax.Array,
           cfg: _Config) -> jax.Array:
    """Padded attention: o [B, Tq, H, D]."""
    return _fwd_impl(q, k, v, q_seg, kv_seg, r_fwd, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, r_fwd, r_dq, r_dkv, cfg):
    o, lse = _fwd_impl(q, k, v, q_seg, kv_seg, r_fwd, cfg)
    return o, (q, k, v, q_seg, kv_seg, r_dq, r_dkv, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, q_seg, kv_seg, r_dq, r_dkv, o, lse = res
    # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: [B, H, Tq] float32
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    # Padded query rows must contribute exactly nothing: p = exp(s - inf) = 0, delta = 0.
    real = jnp.arange(q.shape[1]) < cfg.spec.seq_q
    lse = jnp.where(real, lse, jnp.inf)
    delta = jnp.where(real, delta, 0.0)
    do = do.astype(q.dtype)
    bs = cfg.blocks
    if cfg.use_mgpu_bwd:
        common = dict(spec=cfg.spec, scale=cfg.scale, softcap=cfg.softcap,
                      block_q=bs.mgpu_block_q_bwd, block_kv=bs.mgpu_block_kv_bwd,
                      num_stages=bs.mgpu_num_stages_bwd or bs.mgpu_num_stages,
                      interpret=cfg.backend is Backend.MOSAIC_INTERPRET,
                      profile_dir=bs.mgpu_profile_dir)
        if bs.mgpu_fused_bwd:
            dq, dk, dv = mgpu_fused.backward_fused(q, k, v, do, lse, delta, r_dkv, q_seg, kv_seg,
                                                   pair_dq=bs.mgpu_fused_pair_dq,
                                                   overlap=bs.mgpu_bwd_overlap,
                                                   stats_tma=bs.mgpu_bwd_stats_tma, **common)
            return dq, dk, dv, None, None, None, None, None
        dq = mgpu_bwd.backward_dq(q, k, v, do, lse, delta, r_dq, q_seg, kv_seg,
                                  reverse_tiles=bs.mgpu_reverse_tiles,
                                  overlap=bs.mgpu_bwd_overlap, **common)
        dk, dv = mgpu_bwd.backward_dkv(q, k, v, do, lse, delta, r_dkv, q_seg, kv_seg,
                                       group_in_kernel=bs.mgpu_dkv_group,
                                       overlap=bs.mgpu_bwd_overlap,
                                       stats_tma=bs.mgpu_bwd_stats_tma, **common)
        return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None
    common = dict(spec=cfg.spec, scale=cfg.scale, softcap=cfg.softcap,
                  num_warps=bs.num_warps_bwd, num_stages=bs.num_stages_bwd,
                  interpret=cfg.backend.interpreted)
    dq = portable.backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, r_dq,
                              block_q=bs.block_q_dq, block_kv=bs.block_kv_dq, **common)
    dk, dv = portable.backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, r_dkv,
                                   block_q=bs.block_q_dkv, block_kv=bs.block_kv_dkv, **common)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_backend() -> Backend:
    """MOSAIC_GPU on Hopper (compute capability 9.x), TRITON on other GPUs, INTERPRET on CPU."""
    if jax.default_backend() != "gpu":
        return Backend.INTERPRET
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    return Backend.MOSAIC_GPU if capability.startswith("9") else Backend.TRITON


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    causal: bool = True,
                    segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None,
                    sliding_window: int | None = None,
                    softcap: float | None = None,
                    scale: float | None = None,
                    block_sizes: BlockSizes | None = None,
                    backend: Backend | str | None = None) -> jax.Array:
    """Differentiable flash attention. q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D].

    segment_ids [B, T] int (kv_segment_ids [B, S], defaults to segment_ids); sliding_window: a key j
    is visible from query i iff i + (S - T) - window < j; softcap: scores become
    softcap * tanh(scores / softcap); scale defaults to head_dim ** -0.5. Any T, S (padded inside).
    backend None: `default_backend()`. MOSAIC_GPU runs the Mosaic kernels where `supported`
    (head_dim a multiple of 64, the backward up to 128; bf16/fp16; segment ids unless
    BlockSizes.mgpu_segments is off) and the portable kernels for the rest.
    """
    _check(q, k, v, segment_ids, kv_segment_ids, sliding_window, softcap, scale)
    if isinstance(backend, str):
        try:
            backend = Backend(backend)
        except ValueError:
            raise KernelError(f"{backend=} is not one of {[b.value for b in Backend]}") from None
    backend = default_backend() if backend is None else backend
    batch, seq_q, heads, head_dim = q.shape
    seq_kv = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    blocks = BlockSizes.for_head_dim(head_dim) if block_sizes is None else block_sizes
    blocks = dataclasses.replace(
        blocks, **{f: _fit(getattr(blocks, f), seq_q) for f in ("block_q", "block_q_dq",
                                                                  "block_q_dkv")},
        **{f: _fit(getattr(blocks, f), seq_kv) for f in ("block_kv", "block_kv_dq",
                                                         "block_kv_dkv")})
    use_mgpu = (backend.mosaic and mgpu.supported(head_dim, q.dtype)
                and (segment_ids is None or blocks.mgpu_segments))
    use_mgpu_bwd = use_mgpu and blocks.mgpu_backward and mgpu_bwd.supported(head_dim, q.dtype)
    q_mult = max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv,
                 2 * blocks.mgpu_block_q if use_mgpu else 1,
                 2 * blocks.mgpu_block_q_bwd if use_mgpu_bwd else 1)
    kv_mult = max(blocks.block_kv, blocks.block_kv_dq, blocks.block_kv_dkv,
                  blocks.mgpu_block_kv if use_mgpu else 1,
                  2 * blocks.mgpu_block_kv_bwd if use_mgpu_bwd else 1)
    seq_q_pad, seq_kv_pad = _round_up(seq_q, q_mult), _round_up(seq_kv, kv_mult)
    d_pad = max(16, 1 << (head_dim - 1).bit_length())

    spec = portable.MaskSpec(seq_q=seq_q, seq_kv=seq_kv, causal=causal,
                             sliding_window=sliding_window, has_segments=segment_ids is not None,
                             kv_padded=seq_kv_pad != seq_kv)
    cfg = _Config(spec=spec, scale=scale, softcap=None if softcap is None else float(softcap),
                  blocks=blocks, backend=backend, use_mgpu=use_mgpu, use_mgpu_bwd=use_mgpu_bwd)

    def pad(x: jax.Array, seq: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, seq - x.shape[1]), (0, 0), (0, d_pad - head_dim)))

    qp, kp, vp = pad(q, seq_q_pad), pad(k, seq_kv_pad), pad(v, seq_kv_pad)
    q_seg = kv_seg = None
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, seq_q_pad - seq_q)),
                        constant_values=-1)
        kv_seg = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, seq_kv_pad - seq_kv)),
                         constant_values=-2)
    vis = lambda bq, bk: _block_visibility(spec, bq, bk, seq_q_pad, seq_kv_pad, q_seg, kv_seg)
    r_fwd = _ranges(*(vis(2 * blocks.mgpu_block_q, blocks.mgpu_block_kv) if use_mgpu
                      else vis(blocks.block_q, blocks.block_kv)))
    if use_mgpu_bwd:  # CTAs of two warpgroups: 2 * block rows (dq) / keys (dkv)
        bq, bk = blocks.mgpu_block_q_bwd, blocks.mgpu_block_kv_bwd
        r_dq = _ranges(*vis(2 * bq, bk))
        r_dkv = _ranges(*(jnp.swapaxes(x, 1, 2) for x in vis(bq, 2 * bk)))
    else:
        r_dq = _ranges(*vis(blocks.block_q_dq, blocks.block_kv_dq))
        r_dkv = _ranges(*(jnp.swapaxes(x, 1, 2)
                          for x in vis(blocks.block_q_dkv, blocks.block_kv_dkv)))
    r_fwd, r_dq, r_dkv = (jnp.broadcast_to(r, (batch,) + r.shape[1:]) for r in (r_fwd, r_dq, r_dkv))
    o = _flash(qp, kp, vp, q_seg, kv_seg, r_fwd, r_dq, r_dkv, cfg)
    return o[:, :seq_q, :, :head_dim]
