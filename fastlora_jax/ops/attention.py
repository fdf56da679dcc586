"""Attention dispatch: the model calls `attention(...)` and never knows which kernel ran."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.kernels.attention_reference import attention_mask, flash_attention_reference
from fastlora_jax.ops import partition
from fastlora_jax.ops.impl import Impl, resolve


def gpu_default_impl(*, segment_ids: jax.Array | None, sliding_window: int | None,
                     softcap: float | None) -> Impl:
    """Which implementation the GPU runs by default (benchmarks/RESULTS.md, H200, jax 0.11.2).

    PALLAS (our flash attention) when segment_ids or softcap is given: cuDNN needs a dense
    [T, T] mask for packed documents (measured 6.9x slower than our block-skipping kernel on 8
    documents per 4096-token row) and has no softcap at all (the fallback would be the O(T^2)
    reference). Otherwise CUDNN — also for a sliding window alone, which cuDNN takes as
    `local_window_size` (478 vs our 418 TF/s fwd+bwd at seq 16K, window 4096) — since it was
    faster than our kernels for plain causal / full attention at every length measured.
    """
    if segment_ids is not None or softcap is not None:
        return Impl.PALLAS
    return Impl.CUDNN


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              segment_ids: jax.Array | None = None,
              causal: bool = True,
              sliding_window: int | None = None,
              softcap: float | None = None,
              scale: float | None = None,
              impl: Impl | str | None = None) -> jax.Array:
    """Multi-head attention with GQA. q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D].

    segment_ids [B, T] int32: tokens attend only within their segment (packing).
    See `kernels/attention_reference.py` for the exact semantics every implementation follows.
    The GPU default is `gpu_default_impl(...)`; the CPU default is the reference.
    Under a context mesh it runs per shard (`ops/partition.py`: batch over data x fsdp, heads
    over tensor).
    """
    if partition.active_mesh() is not None:
        def local(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
            return attention(q, k, v, segment_ids=seg, causal=causal,
                             sliding_window=sliding_window, softcap=softcap, scale=scale,
                             impl=impl)

        return partition.attention(local, q, k, v, segment_ids)
    gpu_default = gpu_default_impl(segment_ids=segment_ids, sliding_window=sliding_window,
                                   softcap=softcap)
    which = resolve(impl, gpu_default=gpu_default, cpu_default=Impl.REFERENCE)
    if which is Impl.REFERENCE:
        return flash_attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                                         sliding_window=sliding_window, softcap=softcap, scale=scale)
    if which is Impl.PALLAS:
        from fastlora_jax.kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               sliding_window=sliding_window, softcap=softcap, scale=scale)
    # XLA / CUDNN through jax.nn.dot_product_attention. Softcap is not supported there.
    if softcap is not None:
        return flash_attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                                         sliding_window=sliding_window, softcap=softcap, scale=scale)
    window = None
    if (sliding_window is not None and segment_ids is None and causal
            and q.shape[1] == k.shape[1]):
        # a key is visible iff i - window < j <= i: (window - 1) keys to the left, none right
        window, sliding_window = (sliding_window - 1, 0), None
    mask = None
    if segment_ids is not None or sliding_window is not None:
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window,
                              q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=causal and mask is None,
        local_window_size=window, implementation="cudnn" if which is Impl.CUDNN else "xla")
