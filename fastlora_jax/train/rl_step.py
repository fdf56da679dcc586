"""The jit'd step the GRPO and DPO trainers share: gradient accumulation over micro-batches of
an objective, then the optimizer update.

A step's batch holds A micro-batches: every array has a leading axis A. An objective is a
hashable callable `objective(frozen, A, lora, mb, dropout_key) -> (loss, metric sums)` for one
micro-batch, its loss already normalised so that the step's loss is the plain sum over
micro-batches (each objective decides its normalisation, as TRL does per loss type); each metric
is a [sum, count] pair, reported as sum / count over the step. Gradients flow only into the
float32 LoRA tree.
"""

from __future__ import annotations

import functools
import math
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


def _accumulated(objective: Any, lora: Params, frozen: Params, batch: dict[str, jax.Array],
                 dropout_key: jax.Array | None
                 ) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    micro = functools.partial(objective, frozen, jax.tree.leaves(batch)[0].shape[0])
    loss, sums, grads = accumulate(micro, lora, batch, dropout_key)
    return loss, {k: v[0] / jnp.maximum(v[1], 1.0) for k, v in sums.items()}, grads


@functools.partial(jax.jit, static_argnames=("objective",))
def loss_and_grads(lora: Params, frozen: Params, batch: dict[str, jax.Array], *, objective: Any,
                   dropout_key: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """The step's loss, metrics and LoRA gradients over an [A, ...] batch (no update)."""
    return _accumulated(objective, lora, frozen, batch, dropout_key)


@functools.partial(jax.jit, static_argnames=("objective", "optimizer"),
                   donate_argnames=("lora", "opt_state"))
def update_step(lora: Params, opt_state: Any, frozen: Params, batch: dict[str, jax.Array], *,
                objective: Any, optimizer: optax.GradientTransformation,
                dropout_key: jax.Array | None = None) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One optimizer step; returns new params, state and metrics (loss, the objective's,
    grad_norm, learning_rate)."""
    loss, metrics, grads = _accumulated(objective, lora, frozen, batch, dropout_key)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    return lora, opt_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                                 learning_rate=current_lr(opt_state))


def optimizer_for(args: Any, total_steps: int) -> tuple[optax.GradientTransformation, int]:
    """(AdamW with clipping and the schedule of `args`, warmup steps) for a run of total_steps."""
    from fastlora_jax.train.step import make_optimizer

    warmup = args.warmup_steps or int(math.ceil(args.warmup_ratio * total_steps))
    return make_optimizer(
        learning_rate=args.learning_rate, warmup_steps=warmup, total_steps=total_steps,
        lr_scheduler_type=args.lr_scheduler_type, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon), warmup



class TrainRun:
    """What the GRPO and DPO loops share around their steps: the output folder, a fresh or
    resumed (lora, opt_state, start step), the logger, the non-finite guard, checkpoint saving,
    and — on `close`, also after an error — the adapter put back on the model."""

    def __init__(self, model: Any, args: Any, optimizer: optax.GradientTransformation,
                 total_steps: int, resume_from_checkpoint: bool | str,
                 curves: tuple[str, ...]) -> None:
        import pathlib

        from fastlora_jax.errors import ConfigError
        from fastlora_jax.train.checkpoint import TrainCheckpoints
        from fastlora_jax.train.logs import RunLogger
        from fastlora_jax.train.trainer import _writable_dir

        self.model, self.args, self.total_steps = model, args, total_steps
        self.out_dir = _writable_dir(pathlib.Path(args.output_dir))
        self.checkpoints = TrainCheckpoints(self.out_dir, max_to_keep=args.save_total_limit)
        self.lora = jax.tree.map(jnp.copy, model.lora_params())  # the step donates its inputs
        self.opt_state = optimizer.init(self.lora)
        self.frozen = model.params()
        latest = self.checkpoints.latest_step()
        self.start = 0
        if not resume_from_checkpoint and latest is not None:
            self.checkpoints.close()
            raise ConfigError(f"output_dir {str(self.out_dir)!r} already holds checkpoints "
                              f"(latest step {latest}); resume with resume_from_checkpoint=True "
                              f"or choose another output_dir")
        if resume_from_checkpoint:
            if latest is None:
                self.checkpoints.close()
                raise ConfigError(f"resume_from_checkpoint: no checkpoint in "
                                  f"{str(self.checkpoints.directory)!r}")
            state, meta = self.checkpoints.restore(latest, {"lora": self.lora,
                                                            "opt_state": self.opt_state})
            self.lora, self.opt_state = state["lora"], state["opt_state"]
            self.start = int(meta["step"])
        self.last_saved = self.start
        self.logger = RunLogger(self.out_dir, total_steps=total_steps, start_step=self.start,
                                tensorboard=args.report_to == "tensorboard",
                                show_progress=not args.disable_tqdm, curves=curves)
        self.base_key = jax.random.key(args.seed)
        self.dropout = model.lora_spec.config.lora_dropout > 0

    def dropout_key(self, step: int) -> jax.Array | None:
        return jax.random.fold_in(self.base_key, step) if self.dropout else None

    def accept(self, step: int, metrics: dict[str, jax.Array], lora: Params,
               opt_state: Any) -> dict[str, float]:
        """Take a finished step's results (refusing non-finite ones); returns host metrics."""
        from fastlora_jax.errors import TrainingError

        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
            raise TrainingError(
                f"non-finite loss/grad norm at step {step + 1} (loss={m['loss']}, grad_norm="
                f"{m['grad_norm']}); training stopped, the last good checkpoint (step "
                f"{self.last_saved}) in {str(self.checkpoints.directory)!r} is intact. Lower "
                f"learning_rate or check the data")
        self.lora, self.opt_state = lora, opt_state
        return m

    def after_step(self, done: int, record: dict[str, float], tokens: float) -> bool:
        """Log (every logging_steps and at the end) and save (every save_steps and at the end);
        returns whether this step was logged."""
        a = self.args
        logged = done % a.logging_steps == 0 or done == self.total_steps
        if logged:
            self.logger.log(done, record, tokens)
        if (a.save_steps and done % a.save_steps == 0) or done == self.total_steps:
            self.checkpoints.save(done, {"lora": self.lora, "opt_state": self.opt_state},
                                  {"seed": a.seed, "total_steps": self.total_steps})
            self.last_saved = done
        return logged

    def close(self) -> None:
        self.logger.close()
        self.checkpoints.close()
        self.model.set_adapter(self.model.lora_spec, jax.device_get(self.lora))
