"""Attention dispatch: the model calls `attention(...)` and never knows which kernel ran."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastlora_jax.kernels.attention_mask import dense_mask
from fastlora_jax.kernels.attention_dense import dense_attention
from fastlora_jax.kernels.attention_reference import flash_attention_reference
from fastlora_jax.ops import defaults, partition
from fastlora_jax.ops.impl import Impl, as_impl, is_hopper, on_gpu


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              segment_ids: jax.Array | None = None,
              causal: bool = True,
              sliding_window: int | None = None,
              softcap: float | None = None,
              scale: float | None = None,
              impl: Impl | str | None = None,
              bidirectional_ids: jax.Array | None = None) -> jax.Array:
    """Multi-head attention with GQA. q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D].

    segment_ids [B, T] int32: tokens attend only within their segment (packing).
    bidirectional_ids [B, T] int32 (q and k/v the same tokens): tokens sharing a nonzero id see
    each other both ways (one image's tokens in Gemma 3); the Pallas kernels take no such ids,
    so with them a Pallas choice runs the XLA path on the dense mask instead.
    See `kernels/attention_reference.py` for the exact semantics every implementation follows.
    impl None: `defaults.attention_impl` (GPU: cuDNN, or our kernels for segment ids and
    softcap, or XLA where cuDNN refuses the call: float32, odd lengths; CPU: XLA). XLA on the CPU runs `kernels/attention_dense.py` (the reference's math
    with a hand-written backward; softcap included); XLA on the GPU and CUDNN run
    jax.nn.dot_product_attention, which has no softcap: with one they run the reference.
    Under a context mesh it runs per shard (`ops/partition.py`: batch over data x fsdp, heads
    over tensor).
    """
    if partition.active_mesh() is not None:
        if bidirectional_ids is not None:  # both id arrays travel, batch-split alike
            def local_ids(q: jax.Array, k: jax.Array, v: jax.Array,
                          ids: tuple[jax.Array | None, jax.Array]) -> jax.Array:
                return attention(q, k, v, segment_ids=ids[0], causal=causal,
                                 sliding_window=sliding_window, softcap=softcap, scale=scale,
                                 impl=impl, bidirectional_ids=ids[1])

            return partition.attention(local_ids, q, k, v, (segment_ids, bidirectional_ids))

        def local(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
            return attention(q, k, v, segment_ids=seg, causal=causal,
                             sliding_window=sliding_window, softcap=softcap, scale=scale,
                             impl=impl)

        return partition.attention(local, q, k, v, segment_ids)
    which = as_impl(impl, "attention")
    if which is None:
        gpu, hopper = on_gpu(), is_hopper()
        which = defaults.attention_impl(
            gpu=gpu, hopper=hopper, segments=segment_ids is not None,
            softcap=softcap is not None,
            cudnn_fits=gpu and defaults.cudnn_takes(dtype=q.dtype, head_dim=q.shape[-1],
                                                    q_len=q.shape[1], kv_len=k.shape[1],
                                                    hopper=hopper))
    if bidirectional_ids is not None and which.pallas:
        which = Impl.XLA
    if which is Impl.XLA and not on_gpu():
        return dense_attention(q, k, v, segment_ids, segment_ids, bidirectional_ids, causal,
                               sliding_window, softcap,
                               q.shape[-1] ** -0.5 if scale is None else scale)
    if which is Impl.REFERENCE or (softcap is not None and not which.pallas):
        # Under a gradient, keep q, k, v for the backward and recompute the scores there:
        # autodiff of the softmax otherwise keeps three float32 [B, H, T, T] arrays per layer
        # (stacked over the layer scan), more traffic than the recomputation costs.
        return jax.checkpoint(
            lambda q, k, v, seg, bid: flash_attention_reference(
                q, k, v, causal=causal, segment_ids=seg, sliding_window=sliding_window,
                softcap=softcap, scale=scale, bidirectional_ids=bid),
            policy=jax.checkpoint_policies.nothing_saveable)(q, k, v, segment_ids,
                                                             bidirectional_ids)
    if which.pallas:
        from fastlora_jax.kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               sliding_window=sliding_window, softcap=softcap, scale=scale,
                               impl=which)
    window = None
    if (sliding_window is not None and segment_ids is None and bidirectional_ids is None
            and causal and q.shape[1] == k.shape[1]):
        # a key is visible iff i - window < j <= i: (window - 1) keys to the left, none right
        window, sliding_window = (sliding_window - 1, 0), None
    mask = None
    if segment_ids is not None or sliding_window is not None or bidirectional_ids is not None:
        mask = dense_mask(q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window,
                          q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                          bidirectional_ids=bidirectional_ids)
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=causal and mask is None,
        local_window_size=window, implementation="cudnn" if which is Impl.CUDNN else "xla")
