"""Token-chunked cross-entropy that never materialises the float32 [tokens, vocab] logits.

The final hidden states are split into chunks of `chunk` tokens; a `lax.scan` computes each chunk's
logits (lm_head, optional final softcap), logsumexp and target logit, and keeps only the per-chunk
sums. The scan body is rematerialised, so the backward pass recomputes one chunk's logits at a
time: peak memory is O(chunk * vocab), not O(tokens * vocab).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def _chunk_loss(h: jax.Array, w: jax.Array, targets: jax.Array,
                softcap: float | None) -> tuple[jax.Array, jax.Array]:
    """h [C, H], w [V, H], targets [C] -> (sum of token losses, number of counted tokens)."""
    logits = jnp.einsum("ch,vh->cv", h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32)                      # [C, V] fp32
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return cross_entropy_reference(logits, targets)


def token_chunks(h: jax.Array, targets: jax.Array, chunk: int,
                 fill: int) -> tuple[jax.Array, jax.Array]:
    """h [..., H], targets [...] -> ([n, C, H], [n, C]): tokens flattened, cut into chunks of
    C = min(chunk, tokens), the last one padded (targets with `fill`)."""
    hidden = h.shape[-1]
    h = h.reshape(-1, hidden)
    targets = targets.reshape(-1)
    chunk = min(chunk, h.shape[0])
    pad = (-h.shape[0]) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad), constant_values=fill)
    return h.reshape(-1, chunk, hidden), targets.reshape(-1, chunk)


def cross_entropy_sum(h: jax.Array, w: jax.Array, targets: jax.Array, *, chunk: int = 1024,
                      softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token losses and count of counted tokens.

    h [..., H] final hidden states, w [V, H] the output matrix, targets [...] int32 with
    IGNORE (-100) for positions that carry no label. float32 results.
    """
    hc, tc = token_chunks(h, targets, chunk, IGNORE)

    @jax.checkpoint
    def body(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array]):
        loss, count = _chunk_loss(xs[0], w, xs[1], softcap)
        return (carry[0] + loss, carry[1] + count), None

    (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (hc, tc))
    return total, count


def cross_entropy_reference(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The same sums from full logits [..., V] (the definition the chunked path must equal)."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tl = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - tl, 0.0)), jnp.sum(valid.astype(jnp.float32))
