"""What the GRPO and DPO steps share: gradient accumulation over micro-batches and the update.

A step's batch holds A micro-batches: every array has a leading axis A. `micro_loss(lora, mb,
key)` returns (loss, metric sums) for one micro-batch, already normalised so that the step's
loss is the plain sum over micro-batches (each objective decides its own normalisation, as TRL
does per loss type). Gradients flow only into the float32 LoRA tree.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fastlora_jax.models.decoder import Params
from fastlora_jax.train.step import current_lr

MicroLoss = Callable[[Params, dict[str, jax.Array], jax.Array | None],
                     tuple[jax.Array, dict[str, jax.Array]]]


def accumulate(micro_loss: MicroLoss, lora: Params, batch: dict[str, jax.Array],
               dropout_key: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """(summed loss, summed metrics, summed grads) over the A micro-batches of `batch`."""
    steps = jax.tree.leaves(batch)[0].shape[0]
    keys = (jax.random.split(dropout_key, steps) if dropout_key is not None
            else jnp.zeros((steps,), jnp.uint32))

    def micro(carry: tuple[jax.Array, dict[str, jax.Array], Params],
              xs: tuple[dict[str, jax.Array], jax.Array]):
        loss_acc, metric_acc, grad_acc = carry
        mb, key = xs
        (loss, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(
            lora, mb, key if dropout_key is not None else None)
        return (loss_acc + loss, jax.tree.map(jnp.add, metric_acc, metrics),
                jax.tree.map(jnp.add, grad_acc, grads)), None

    first = jax.tree.map(lambda a: a[0], batch)
    metric_shapes = jax.eval_shape(lambda: micro_loss(lora, first, None)[1])
    zeros = (jnp.float32(0), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
             jax.tree.map(jnp.zeros_like, lora))
    (loss, metrics, grads), _ = jax.lax.scan(micro, zeros, (batch, keys))
    return loss, metrics, grads


def apply_update(optimizer: optax.GradientTransformation, lora: Params, opt_state: Any,
                 grads: Params) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One optimizer update; returns new params, state and {grad_norm, learning_rate}."""
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    return lora, opt_state, {"grad_norm": optax.tree.norm(grads),
                             "learning_rate": current_lr(opt_state)}


def start_run(checkpoints: Any, lora: Params, opt_state: Any,
              resume_from_checkpoint: bool | str) -> tuple[Params, Any, int]:
    """(lora, opt_state, first step): fresh, or restored from the latest checkpoint. A run that
    would overwrite existing checkpoints without resuming is refused."""
    from fastlora_jax.errors import ConfigError

    latest = checkpoints.latest_step()
    if not resume_from_checkpoint:
        if latest is not None:
            raise ConfigError(f"output_dir {str(checkpoints.directory.parent)!r} already holds "
                              f"checkpoints (latest step {latest}); resume with "
                              f"resume_from_checkpoint=True or choose another output_dir")
        return lora, opt_state, 0
    if latest is None:
        raise ConfigError(f"resume_from_checkpoint: no checkpoint in "
                          f"{str(checkpoints.directory)!r}")
    lora, opt_state, meta = checkpoints.restore(latest, lora, opt_state)
    return lora, opt_state, int(meta["step"])
