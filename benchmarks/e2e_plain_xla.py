"""The plain-XLA JAX baseline: a Llama LoRA training step as a JAX user writes it by hand.

No fastlora_jax code: bf16 frozen weights stacked per layer and `lax.scan`ned, XLA matmuls,
cuDNN attention through `jax.nn.dot_product_attention`, LoRA (fp32 masters, bf16 compute) on the
seven projections, a token-chunked cross-entropy, optax AdamW with clipping, gradient
accumulation by `lax.scan` over micro-batches, and the remat policy that measured fastest for it
(`dots_with_no_batch_dims_saveable`: keep the matmul outputs, recompute the elementwise work).
`benchmarks/train_e2e.py` times it beside ours in the same run.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

PROJ = {"q": ("attn", "heads"), "k": ("attn", "kv"), "v": ("attn", "kv"), "o": ("attn", "o"),
        "gate": ("mlp", "mlp"), "up": ("mlp", "mlp"), "down": ("mlp", "down")}


def shapes(c: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection."""
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h),
            "down": (h, i)}


def init(c: dict, key: jax.Array, rank: int) -> tuple[dict, dict]:
    """(frozen bf16 params, LoRA fp32 params); A ~ U(+-1/sqrt(in)), B = 0 as PEFT."""
    L = c["num_hidden_layers"]
    frozen: dict[str, Any] = {
        "embed": 0.02 * jax.random.normal(jax.random.fold_in(key, 0),
                                          (c["vocab_size"], c["hidden_size"]), jnp.bfloat16),
        "head": 0.02 * jax.random.normal(jax.random.fold_in(key, 1),
                                         (c["vocab_size"], c["hidden_size"]), jnp.bfloat16),
        "final_norm": jnp.ones((c["hidden_size"],), jnp.bfloat16),
        "ln1": jnp.ones((L, c["hidden_size"]), jnp.bfloat16),
        "ln2": jnp.ones((L, c["hidden_size"]), jnp.bfloat16)}
    lora = {}
    for n, (name, (out, inp)) in enumerate(shapes(c).items()):
        k = jax.random.fold_in(key, 10 + n)
        frozen[name] = 0.02 * jax.random.normal(k, (L, out, inp), jnp.bfloat16)
        a = jax.random.uniform(jax.random.fold_in(k, 1), (L, rank, inp), jnp.float32, -1, 1)
        lora[name] = {"A": a / math.sqrt(inp), "B": jnp.zeros((L, out, rank), jnp.float32)}
    return frozen, lora


def _rms(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


def loss_fn(lora: dict, frozen: dict, ids: jax.Array, targets: jax.Array, c: dict,
            scale: float, chunk: int) -> jax.Array:
    """Sum of token cross-entropies over ids [B, T] (targets -100 = no loss)."""
    b, t = ids.shape
    d, hq, hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    eps = c["rms_norm_eps"]
    inv = 1.0 / (c["rope_theta"] ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]

    def proj(x: jax.Array, w: jax.Array, lo: dict) -> jax.Array:
        y = x @ w.T
        low = (x @ lo["A"].astype(x.dtype).T) @ lo["B"].astype(x.dtype).T
        return y + (scale * low).astype(y.dtype)

    def layer(h: jax.Array, xs: tuple[dict, dict]) -> tuple[jax.Array, None]:
        w, lo = xs
        x = _rms(h, w["ln1"], eps)
        q = _rope(proj(x, w["q"], lo["q"]).reshape(b, t, hq, d), cos, sin)
        k = _rope(proj(x, w["k"], lo["k"]).reshape(b, t, hkv, d), cos, sin)
        v = proj(x, w["v"], lo["v"]).reshape(b, t, hkv, d)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"
                                         if jax.default_backend() == "gpu" else "xla")
        h = h + proj(a.reshape(b, t, hq * d), w["o"], lo["o"])
        x = _rms(h, w["ln2"], eps)
        g = jax.nn.silu(proj(x, w["gate"], lo["gate"])) * proj(x, w["up"], lo["up"])
        return h + proj(g, w["down"], lo["down"]), None

    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    per_layer = {k: frozen[k] for k in ("ln1", "ln2", *PROJ)}
    h = jnp.take(frozen["embed"], ids, axis=0)
    h, _ = jax.lax.scan(layer, h, (per_layer, lora))
    h = _rms(h, frozen["final_norm"], eps).reshape(b * t, -1)
    tg = targets.reshape(b * t)
    n = h.shape[0] // chunk

    @jax.checkpoint
    def chunk_loss(carry: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        hc, tc = xs
        logits = (hc @ frozen["head"].T).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.maximum(tc, 0)[:, None], axis=-1)[:, 0]
        return carry + jnp.sum(jnp.where(tc >= 0, lse - picked, 0.0)), None

    total, _ = jax.lax.scan(chunk_loss, jnp.float32(0),
                            (h.reshape(n, chunk, -1), tg.reshape(n, chunk)))
    return total


@functools.partial(jax.jit, static_argnames=("c", "opt", "scale", "chunk"),
                   donate_argnums=(0, 1))
def train_step(lora: dict, opt_state: Any, frozen: dict, ids: jax.Array, targets: jax.Array, *,
               c: tuple, opt: optax.GradientTransformation, scale: float, chunk: int):
    """One optimizer step over ids/targets [A, B, T]; c is the config as a sorted item tuple."""
    cfg = dict(c)
    count = jnp.maximum(jnp.sum(targets >= 0), 1).astype(jnp.float32)

    def micro(carry: tuple[jax.Array, dict], xs: tuple[jax.Array, jax.Array]):
        loss, grads = carry
        value, g = jax.value_and_grad(lambda lo: loss_fn(lo, frozen, *xs, cfg, scale, chunk)
                                      / count)(lora)
        return (loss + value, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, lora)
    (loss, grads), _ = jax.lax.scan(micro, (jnp.float32(0), zeros), (ids, targets))
    updates, opt_state = opt.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
