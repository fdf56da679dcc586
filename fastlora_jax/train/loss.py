"""Token-chunked cross-entropy that never materialises the float32 [tokens, vocab] logits.

The final hidden states are split into chunks of `chunk` tokens; a `lax.scan` computes each chunk's
logits (lm_head, optional final softcap), logsumexp and target logit, and keeps only the per-chunk
sums: peak memory is O(chunk * vocab), not O(tokens * vocab). Two backward passes, one choice
(`grad_in_forward`, default `ops.defaults.loss_grad_in_forward`):
- False: the scan body is rematerialised, so the backward recomputes one chunk's logits at a time
  (three [chunk, vocab] GEMMs per chunk: logits, their recomputation, dh);
- True: under differentiation each chunk's softmax gradient is turned into dh (and dw when w is
  differentiated) while its logits are at hand, and the backward only scales the kept dh by the
  loss's cotangent (two GEMMs per chunk; a [tokens, hidden] residual).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fastlora_jax.ops import defaults
from fastlora_jax.ops.impl import on_gpu

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
                      softcap: float | None = None, grad_in_forward: bool | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token losses and count of counted tokens.

    h [..., H] final hidden states, w [V, H] the output matrix, targets [...] int32 with
    IGNORE (-100) for positions that carry no label. float32 results. `grad_in_forward`: how
    the backward gets its gradients (module docstring; None = the platform's default).
    """
    if grad_in_forward is None:
        grad_in_forward = defaults.loss_grad_in_forward(gpu=on_gpu())
    if grad_in_forward:
        total, count = _fused_sums(h, w, targets, chunk, softcap)
        return total, count
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


def _chunk_loss_and_grads(h: jax.Array, w: jax.Array, targets: jax.Array, softcap: float | None,
                          want_dw: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One chunk: (loss sum, count, d(loss sum)/dh [C, H], d(loss sum)/dw [V, H] or None)."""
    logits = jnp.einsum("ch,vh->cv", h, w.astype(h.dtype),
                        preferred_element_type=jnp.float32)                      # [C, V] fp32
    capped = logits if softcap is None else softcap * jnp.tanh(logits / softcap)
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    m = jnp.max(capped, axis=-1, keepdims=True)
    e = jnp.exp(capped - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[:, 0]
    tl = jnp.take_along_axis(capped, safe[:, None], axis=-1)[:, 0]
    loss = jnp.sum(jnp.where(valid, lse - tl, 0.0))
    count = jnp.sum(valid.astype(jnp.float32))
    # d(lse - target logit) / d(logit) = softmax - one_hot(target), zero on uncounted rows
    onehot = jnp.arange(capped.shape[-1])[None, :] == safe[:, None]
    dz = jnp.where(valid[:, None], e / s - onehot, 0.0)
    if softcap is not None:
        dz = dz * (1.0 - jnp.square(capped / softcap))
    dz = dz.astype(h.dtype)
    dh = jnp.einsum("cv,vh->ch", dz, w.astype(h.dtype), preferred_element_type=jnp.float32)
    dw = (jnp.einsum("cv,ch->vh", dz, h, preferred_element_type=jnp.float32) if want_dw
          else None)
    return loss, count, dh, dw


def _fused_forward(h: jax.Array, w: jax.Array, targets: jax.Array, chunk: int,
                   softcap: float | None, want_dw: bool):
    hc, tc = token_chunks(h, targets, chunk, IGNORE)

    def body(carry, xs):
        loss, count, dw = carry
        l, c, dh, dw_c = _chunk_loss_and_grads(xs[0], w, xs[1], softcap, want_dw)
        return (loss + l, count + c, None if dw is None else dw + dw_c), dh

    dw0 = jnp.zeros(w.shape, jnp.float32) if want_dw else None
    (loss, count, dw), dh = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), dw0), (hc, tc))
    n_tokens = h.size // h.shape[-1]
    dh = dh.reshape(-1, h.shape[-1])[:n_tokens].reshape(h.shape)
    return loss, count, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_sums(h: jax.Array, w: jax.Array, targets: jax.Array, chunk: int,
                softcap: float | None) -> tuple[jax.Array, jax.Array]:
    hc, tc = token_chunks(h, targets, chunk, IGNORE)

    def body(carry, xs):
        loss, count = _chunk_loss(xs[0], w, xs[1], softcap)
        return (carry[0] + loss, carry[1] + count), None

    (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (hc, tc))
    return total, count


def _fused_sums_fwd(h, w, targets, chunk, softcap):
    loss, count, dh, dw = _fused_forward(h.value, w.value, targets.value, chunk, softcap,
                                         want_dw=w.perturbed)
    # kept in the inputs' dtypes: the one rounding autodiff's dh and dw get as well
    return (loss, count), (dh.astype(h.value.dtype), None if dw is None else dw.astype(w.value.dtype))


def _fused_sums_bwd(chunk, softcap, res, cotangents):
    dh, dw = res
    g = cotangents[0]  # the count's cotangent is dropped: the count does not depend on h or w
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None

    def scaled(d):
        return None if d is None else (g * d.astype(jnp.float32)).astype(d.dtype)

    return scaled(dh), scaled(dw), None


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd, symbolic_zeros=True)
