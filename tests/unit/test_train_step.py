"""The pure training step: chunked loss, accumulation normalisation, remat modes, schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ConfigError, ModelConfig, TrainingArguments
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.train.args import run_settings
from fastlora_jax.train.loss import IGNORE, cross_entropy_sum
from fastlora_jax.train.step import (StepConfig, accumulated_grads, lr_schedule, make_optimizer,
                                     train_step)

CFG = ModelConfig(model_type="llama", vocab_size=80, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
ALL = tuple(n for _, n in PROJECTIONS)


# The loss and gradients compiled as the training step runs them (one compile per shape and
# config, instead of op-by-op dispatch of the whole model).
grads_of = jax.jit(accumulated_grads, static_argnums=0)


def setup(**lora_kw):
    frozen = decoder.init_params(CFG, jax.random.key(0))
    spec = resolve(LoraConfig.create(init_lora_weights=False, **lora_kw), CFG, ALL)
    return frozen, spec, init_lora(spec, CFG, frozen)


def batch(acc, b, t, seed=0, mask_frac=0.3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(acc, b, t)).astype(np.int32)
    targets = np.roll(ids, -1, axis=-1)
    targets[..., -1] = IGNORE
    targets[rng.random(targets.shape) < mask_frac] = IGNORE
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape).copy()
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
            "positions": jnp.asarray(pos), "segment_ids": jnp.ones_like(jnp.asarray(ids))}


def float64_loss_and_grads(h, w, t, softcap):
    """Sum of token losses and its gradients w.r.t. h and w, written out in float64 numpy:
    logits z = h w^T (softcapped: c tanh(z / c)), loss = logsumexp(z) - z[target] per counted
    token, dz = softmax(z) - onehot(target) (times the softcap's derivative)."""
    h, w, t = np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(t)
    hf = h.reshape(-1, h.shape[-1])
    tf = t.reshape(-1)
    valid = tf != IGNORE
    z = hf @ w.T
    capped = softcap * np.tanh(z / softcap) if softcap else z
    m = capped.max(-1, keepdims=True)
    p = np.exp(capped - m)
    lse = np.log(p.sum(-1)) + m[:, 0]
    safe = np.where(valid, tf, 0)
    loss = np.sum((lse - capped[np.arange(len(tf)), safe]) * valid)
    dcap = p / p.sum(-1, keepdims=True)
    dcap[np.arange(len(tf)), safe] -= 1.0
    dcap *= valid[:, None]
    dz = dcap * (1.0 - np.tanh(z / softcap) ** 2) if softcap else dcap
    return loss, (dz @ w).reshape(h.shape), dz.T @ hf


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_equals_an_independent_float64_loss(softcap, grad_in_forward):
    """Against the loss and gradients written out in numpy (not the reference it is built on);
    37 * 3 tokens in chunks of 16 also exercise the padded last chunk. Both backward passes,
    the loss scaled as the step scales it (the cotangent is not 1)."""
    rng = np.random.default_rng(11)
    h = rng.normal(size=(3, 37, 16)).astype(np.float32)
    w = (rng.normal(size=(50, 16)) / 2).astype(np.float32)
    t = rng.integers(0, 50, size=(3, 37)).astype(np.int32)
    t[0, :5] = IGNORE
    t[2, -3:] = IGNORE
    want_loss, want_dh, want_dw = float64_loss_and_grads(h, w, t, softcap)
    kw = dict(chunk=16, softcap=softcap, grad_in_forward=grad_in_forward)

    def loss_sum(h, w):
        return cross_entropy_sum(h, w, jnp.asarray(t), **kw)[0] / 3.0

    loss, count = cross_entropy_sum(h, w, jnp.asarray(t), **kw)
    dh, dw = jax.jit(jax.grad(loss_sum, (0, 1)))(h, w)
    dh_only = jax.grad(loss_sum)(h, w)  # w not differentiated: the fused path skips dw
    assert float(count) == (t != IGNORE).sum()
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(dh), want_dh / 3.0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), want_dw / 3.0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh_only), want_dh / 3.0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_chunked_loss_keeps_logits_chunked(grad_in_forward):
    """The compiled loss+grad never holds [tokens, vocab] float32 logits at once."""
    tokens, vocab, hidden = 8192, 4096, 64
    h = jnp.zeros((tokens, hidden))
    w = jnp.zeros((vocab, hidden))
    t = jnp.zeros((tokens,), jnp.int32)
    f = jax.jit(jax.grad(lambda h, w: cross_entropy_sum(h, w, t, chunk=512,
                                                        grad_in_forward=grad_in_forward)[0],
                         (0, 1)))
    temp = f.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < tokens * vocab * 4 / 4, temp  # well under the full logits' 128 MiB


def test_accumulation_equals_one_large_batch():
    frozen, spec, lora = setup(r=4)
    cfg = StepConfig(model=CFG, lora=spec, remat=False, loss_chunk=7)
    big = batch(1, 4, 10)
    split = jax.tree.map(lambda a: a.reshape(2, 2, 10), big)
    l1, n1, g1 = grads_of(cfg, lora, frozen, big, None)
    l2, n2, g2 = grads_of(cfg, lora, frozen, split, None)
    assert float(n1) == float(n2)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the naive per-micro-batch mean would differ when micro-batches count different tokens
    naive = sum(float(grads_of(cfg, lora, frozen, jax.tree.map(lambda a: a[i:i + 1], split),
                               None)[0]) for i in range(2)) / 2
    assert abs(naive - float(l1)) > 1e-4


@pytest.mark.parametrize("remat", [False, True, "offload", "dots"])
def test_remat_modes_give_the_same_gradients(remat):
    frozen, spec, lora = setup(r=4)
    b = batch(1, 2, 12)
    ref = accumulated_grads(StepConfig(model=CFG, lora=spec, remat=False), lora, frozen, b, None)
    got = jax.jit(lambda l: accumulated_grads(StepConfig(model=CFG, lora=spec, remat=remat), l,
                                              frozen, b, None))(lora)
    for a, c in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        # float32 rounding, scaled to the leaf: remat recomputes the attention forward inside
        # the backward, where XLA fuses (and rounds) it differently (seen: 1e-5 of the max)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_train_step_decreases_loss_and_only_lora_changes():
    frozen, spec, lora = setup(r=8, lora_alpha=16)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=20)
    cfg = StepConfig(model=CFG, lora=spec)
    state = opt.init(lora)
    b = batch(2, 2, 12)
    frozen_before = jax.tree.map(np.asarray, frozen)
    losses = []
    for _ in range(10):
        lora, state, m = train_step(lora, state, frozen, b, cfg=cfg, optimizer=opt)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1 and losses[5] < losses[0]
    for a, c in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(c))


def test_dropout_changes_the_step_and_is_deterministic():
    frozen, spec, lora = setup(r=4, lora_dropout=0.5)
    cfg = StepConfig(model=CFG, lora=spec)
    b = batch(1, 2, 12)
    a1 = grads_of(cfg, lora, frozen, b, jax.random.key(5))[0]
    a2 = grads_of(cfg, lora, frozen, b, jax.random.key(5))[0]
    a3 = grads_of(cfg, lora, frozen, b, None)[0]
    assert float(a1) == float(a2) and float(a1) != float(a3)


def test_schedules_follow_hf():
    lin = lr_schedule("linear", 1.0, 2, 10)
    assert [round(float(lin(jnp.asarray(s))), 4) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cos = lr_schedule("cosine", 1.0, 0, 10)
    assert float(cos(jnp.asarray(5))) == pytest.approx(0.5, abs=1e-6)
    assert float(lr_schedule("constant_with_warmup", 2.0, 4, 10)(jnp.asarray(2))) == 1.0


def test_right_padded_rows_need_no_segment_ids():
    """Unpacked rows padded on the right: the same loss and grads with or without segment ids."""
    frozen, spec, lora = setup(r=4, lora_alpha=8)
    b = batch(2, 2, 12, seed=5)
    seg = np.ones((2, 2, 12), np.int32)
    seg[0, 1, 7:] = 0  # a short row: padding on its right, with no loss there
    targets = np.asarray(b["targets"]).copy()
    targets[0, 1, 6:] = IGNORE
    padded = dict(b, segment_ids=jnp.asarray(seg), targets=jnp.asarray(targets))
    without = {k: v for k, v in padded.items() if k != "segment_ids"}
    cfg = StepConfig(model=CFG, lora=spec, remat=False)
    loss_a, tok_a, g_a = grads_of(cfg, lora, frozen, padded, None)
    loss_b, tok_b, g_b = grads_of(cfg, lora, frozen, without, None)
    assert tok_a == tok_b
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_a)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_use_gradient_checkpointing_is_a_training_argument():
    from fastlora_jax.cli import build_parser

    assert TrainingArguments().use_gradient_checkpointing is True
    assert TrainingArguments(use_gradient_checkpointing="unsloth").use_gradient_checkpointing == \
        "offload"
    for bad in ("sometimes", 0, None):
        with pytest.raises(ConfigError, match="use_gradient_checkpointing="):
            TrainingArguments(use_gradient_checkpointing=bad)
    def from_flag(text):
        flag = build_parser().parse_args(["train", "--use_gradient_checkpointing", text])
        settings = {"use_gradient_checkpointing": flag.use_gradient_checkpointing}
        return run_settings((settings, "command line"))[2].use_gradient_checkpointing

    assert from_flag("false") is False and from_flag("dots") == "dots"
