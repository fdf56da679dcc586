"""The pure training step: `train_step(lora, opt_state, frozen, batch) -> (lora, opt_state, metrics)`.

A batch holds `accumulation` micro-batches: every array is [A, B, T] (int32): `input_ids`,
`targets` (the next token at each position, -100 where no loss is taken), `positions`, and
optionally `segment_ids` (0 = padding) for packed rows. Rows that are not packed need none: their
padding is on the right, where causal attention keeps it out of every real token's context and the
-100 targets keep it out of the loss; leaving the key out lets the GPU run cuDNN's attention, which
is faster than our segment-aware kernel when there is nothing to skip.

The loss of the optimizer step is the sum of token losses over all micro-batches divided by the
total number of counted tokens over all of them, so accumulated gradients equal one large batch's
(the gradient-accumulation normalisation Unsloth fixed in HF). Gradients flow only into the LoRA
tree (float32 master weights); compute runs in the frozen weights' dtype; the loss is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import ConfigError
from fastlora_jax.lora.layer import lora_project, with_constants
from fastlora_jax.lora.spec import LoraSpec
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params
from fastlora_jax.train.loss import IGNORE, cross_entropy_sum

LAYER_INPUT = decoder.LAYER_INPUT
ScheduleName = Literal["linear", "cosine", "constant", "constant_with_warmup"]
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleName)


def remat_wrapper(mode: bool | str) -> Callable[[Callable], Callable] | None:
    """use_gradient_checkpointing -> how each scanned decoder layer is rematerialised.

    False: keep every activation; True: keep only each layer's input (recompute the rest);
    "offload": the same, with the layer inputs moved to pinned host memory; "dots": keep the
    outputs of the matmuls (not the attention kernel's) and recompute the elementwise work in
    between — JAX's `dots_with_no_batch_dims_saveable`, what a hand-written XLA step uses.
    """
    if mode is False:
        return None
    if mode == "dots":
        return functools.partial(jax.checkpoint,
                                 policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if mode is True:
        return functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    if mode == "offload":
        policy = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host")
        return functools.partial(jax.checkpoint, policy=policy)
    raise ConfigError(f"use_gradient_checkpointing={mode!r} must be False, True, 'offload' or "
                      f"'dots'")


def lr_schedule(kind: str, learning_rate: float, warmup_steps: int,
                total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """HF/TRL's schedules (`get_*_schedule_with_warmup`), as a function of the update count."""
    if kind not in SCHEDULES:
        raise ConfigError(f"lr_scheduler_type={kind!r} must be one of {list(SCHEDULES)}")

    def schedule(count: jax.Array) -> jax.Array:
        step = count.astype(jnp.float32)
        warm = step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            after = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        elif kind == "cosine":
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        elif kind == "constant":
            return jnp.full_like(step, learning_rate)
        else:
            after = jnp.ones_like(step)
        factor = jnp.where(step < warmup_steps, warm, after)
        return learning_rate * factor

    return schedule


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   lr_scheduler_type: str = "linear", weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, adam_beta1: float = 0.9,
                   adam_beta2: float = 0.999, adam_epsilon: float = 1e-8
                   ) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (torch.optim.AdamW semantics), TRL argument names."""
    schedule = lr_schedule(lr_scheduler_type, learning_rate, warmup_steps, total_steps)
    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon,
        weight_decay=weight_decay))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about a training step (hashable: it is a jit static argument)."""

    model: ModelConfig
    lora: LoraSpec
    remat: bool | str = True
    loss_chunk: int = 1024
    attention_impl: Any = None
    linear_impl: Any = None        # the frozen matmuls' `ops.Impl` (None = the measured default)
    loss_grad_in_forward: bool | None = None  # train/loss.py (None = the platform's default)
    # A vision-language model: (its VisionArch, its config). `model` is then its text decoder's
    # config, `lora` a VisionLoraSpec, the frozen / LoRA trees {"language", "vision"}, and each
    # micro-batch may hold the rows' image arrays beside the token arrays (train/vision_data.py;
    # vision/forward.py reads them with rows=True).
    vision: tuple[Any, Any] | None = None


def loss_sums(cfg: StepConfig, lora: Params, frozen: Params, mb: dict[str, jax.Array],
              dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, counted tokens) of one micro-batch [B, T]."""
    if cfg.vision is not None:
        return _vision_loss_sums(cfg, lora, frozen, mb, dropout_key)
    h = decoder.hidden_states(
        cfg.model, frozen, mb["input_ids"], positions=mb["positions"],
        segment_ids=mb.get("segment_ids"), lora=with_constants(lora, cfg.lora, dropout_key),
        project=lora_project(cfg.lora, train=dropout_key is not None,
                             linear_impl=cfg.linear_impl),
        attention_impl=cfg.attention_impl, remat=remat_wrapper(cfg.remat))
    return cross_entropy_sum(h, decoder.lm_head_weight(cfg.model, frozen), mb["targets"],
                             chunk=cfg.loss_chunk, softcap=cfg.model.final_logit_softcap,
                             grad_in_forward=cfg.loss_grad_in_forward)


def _vision_loss_sums(cfg: StepConfig, lora: Params, frozen: Params, mb: dict[str, jax.Array],
                      dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`loss_sums` of a vision-language model: each row's images enter the text decoder's
    embeddings at that row's placeholders."""
    from fastlora_jax.vision import forward as vision_forward  # only vision models need it

    arch, config = cfg.vision
    h = vision_forward.hidden_states(arch, config, cfg.lora, frozen, lora, mb,
                                     dropout_key=dropout_key, attention_impl=cfg.attention_impl,
                                     linear_impl=cfg.linear_impl, remat=remat_wrapper(cfg.remat),
                                     rows=True)
    return cross_entropy_sum(h, decoder.lm_head_weight(cfg.model, frozen["language"]),
                             mb["targets"], chunk=cfg.loss_chunk,
                             softcap=cfg.model.final_logit_softcap,
                             grad_in_forward=cfg.loss_grad_in_forward)


def accumulated_grads(cfg: StepConfig, lora: Params, frozen: Params, batch: dict[str, jax.Array],
                      dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array, Params]:
    """(loss, counted tokens, grads) over the [A, B, T] batch, normalised by all its tokens."""
    total = jnp.sum((batch["targets"] != IGNORE).astype(jnp.float32))
    denom = jnp.maximum(total, 1.0)
    steps = batch["input_ids"].shape[0]
    keys = (jax.random.split(dropout_key, steps) if dropout_key is not None
            else jnp.zeros((steps,), jnp.uint32))

    def micro(carry: tuple[jax.Array, Params], xs: tuple[dict[str, jax.Array], jax.Array]):
        loss_acc, grad_acc = carry
        mb, key = xs
        key = key if dropout_key is not None else None

        def scaled(l: Params) -> jax.Array:
            return loss_sums(cfg, l, frozen, mb, key)[0] / denom

        loss, grads = jax.value_and_grad(scaled)(lora)
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, lora)
    (loss, grads), _ = jax.lax.scan(micro, (jnp.float32(0), zeros), (batch, keys))
    return loss, total, grads


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"), donate_argnames=("lora", "opt_state"))
def train_step(lora: Params, opt_state: Any, frozen: Params, batch: dict[str, jax.Array], *,
               cfg: StepConfig, optimizer: optax.GradientTransformation,
               dropout_key: jax.Array | None = None) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One optimizer step over an [A, B, T] batch; returns new LoRA params, state, metrics.

    A step whose loss or gradient norm is not finite changes nothing (params and optimizer
    state, its step count included, come back as they went in); metrics["skipped"] is 1 then.
    """
    loss, tokens, grads = accumulated_grads(cfg, lora, frozen, batch, dropout_key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_state = optimizer.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    lora, opt_state = jax.tree.map(keep, new_lora, lora), jax.tree.map(keep, new_state, opt_state)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm,
               "learning_rate": current_lr(new_state),
               "skipped": jnp.logical_not(finite).astype(jnp.float32)}
    return lora, opt_state, metrics


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate the last update used (from the inject_hyperparams state)."""
    for state in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams")):
        if hasattr(state, "hyperparams"):
            return jnp.asarray(state.hyperparams["learning_rate"], jnp.float32)
    return jnp.float32(jnp.nan)


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_sums(lora: Params, frozen: Params, batch: dict[str, jax.Array], *,
              cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, counted tokens) of an [A, B, T] batch, without dropout or updates:
    sums over batches divide into the token-weighted mean loss of a whole evaluation set."""

    def micro(carry: tuple[jax.Array, jax.Array], mb: dict[str, jax.Array]):
        loss, count = loss_sums(cfg, lora, frozen, mb, None)
        return (carry[0] + loss, carry[1] + count), None

    (loss, tokens), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
    return loss, tokens
