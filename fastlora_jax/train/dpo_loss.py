"""The DPO objective and its jit'd step, with TRL's loss types.

One micro-batch holds B preference pairs as 2B right-padded rows, chosen rows first:
  input_ids, attention_mask  [2B, S]   prompt + completion, then padding
  completion_mask            [2B, S]   1 on the completion's tokens
  ref_chosen_logps, ref_rejected_logps [B]  (optional) precomputed reference sums; without them
                                            the reference is the same frozen tree, adapters off
Sequence log-probs are sums over completion tokens. With chosen / rejected log-ratios
c = logp_c - ref_c and r = logp_r - ref_r and d = c - r, per pair:
  sigmoid   -log sigmoid(beta d)            (label_smoothing: the robust/conservative mix)
  hinge     relu(1 - beta d)
  ipo       (c / n_c - r / n_r - 1 / (2 beta))^2   (n = completion tokens; TRL's normalisation)
  robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, sigmoid_norm: as in TRL.
Several loss types add with `loss_weights`. The step's loss is the mean over its pairs (each
micro-batch's mean divided by the number of micro-batches, as the HF Trainer accumulates).
`DPOObjective` plugs this into the shared jit'd step (`train/rl_step.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fastlora_jax.errors import ConfigError
from fastlora_jax.models.decoder import Params
from fastlora_jax.train.logprobs import sequence_logprob_sums
from fastlora_jax.train.step import StepConfig

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair",
                  "apo_zero", "apo_down", "sigmoid_norm")


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
    """Static knobs of the objective (hashable)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0


def pair_losses(lcfg: DPOLossConfig, chosen: jax.Array, rejected: jax.Array,
                ref_chosen: jax.Array, ref_rejected: jax.Array, n_chosen: jax.Array,
                n_rejected: jax.Array) -> jax.Array:
    """Per-pair loss [B] from sequence log-prob sums and completion token counts."""
    beta, eps = lcfg.beta, lcfg.label_smoothing
    c, r = chosen - ref_chosen, rejected - ref_rejected
    d = c - r
    logsig = jax.nn.log_sigmoid
    weights = lcfg.loss_weights or (1.0,) * len(lcfg.loss_type)
    total = jnp.zeros_like(d)
    for kind, weight in zip(lcfg.loss_type, weights):
        if kind == "sigmoid":
            loss = -logsig(beta * d) * (1 - eps) - logsig(-beta * d) * eps
        elif kind == "hinge":
            loss = jax.nn.relu(1 - beta * d)
        elif kind == "ipo":
            loss = (c / jnp.maximum(n_chosen, 1.0) - r / jnp.maximum(n_rejected, 1.0)
                    - 1 / (2 * beta)) ** 2
        elif kind == "robust":
            loss = (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            loss = -logsig(beta * c) - logsig(-beta * r)
        elif kind == "sppo_hard":
            loss = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        elif kind == "nca_pair":
            loss = -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
        elif kind == "apo_zero":
            loss = 1 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
        elif kind == "apo_down":
            loss = jax.nn.sigmoid(beta * c) + 1 - jax.nn.sigmoid(beta * (c - r))
        elif kind == "sigmoid_norm":
            loss = -logsig(beta * (c / jnp.maximum(n_chosen, 1.0)
                                   - r / jnp.maximum(n_rejected, 1.0)))
        else:  # DPOConfig validates loss_type; this guards direct callers
            raise ConfigError(f"unknown DPO loss_type {kind!r}; known: {list(DPO_LOSS_TYPES)}")
        total = total + weight * loss
    return total


def dpo_micro_loss(cfg: StepConfig, lcfg: DPOLossConfig, frozen: Params, micro_batches: int,
                   lora: Params, mb: dict[str, jax.Array], dropout_key: jax.Array | None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss share, metric sums) of one micro-batch of pairs."""
    logps, ent, counts = sequence_logprob_sums(cfg, frozen, lora, mb["input_ids"],
                                               mb["attention_mask"], mb["completion_mask"],
                                               dropout_key)
    pairs = logps.shape[0] // 2
    if "ref_chosen_logps" in mb:
        ref_c, ref_r = mb["ref_chosen_logps"], mb["ref_rejected_logps"]
    else:
        ref, _, _ = sequence_logprob_sums(cfg, frozen, None, mb["input_ids"],
                                          mb["attention_mask"], mb["completion_mask"])
        ref = jax.lax.stop_gradient(ref)
        ref_c, ref_r = ref[:pairs], ref[pairs:]
    chosen, rejected = logps[:pairs], logps[pairs:]
    losses = pair_losses(lcfg, chosen, rejected, ref_c, ref_r, counts[:pairs], counts[pairs:])
    reward_c = jax.lax.stop_gradient(lcfg.beta * (chosen - ref_c))
    reward_r = jax.lax.stop_gradient(lcfg.beta * (rejected - ref_r))
    n = jnp.float32(pairs)
    metrics = {"rewards/chosen": jnp.stack([jnp.sum(reward_c), n]),
               "rewards/rejected": jnp.stack([jnp.sum(reward_r), n]),
               "rewards/accuracies": jnp.stack([jnp.sum((reward_c > reward_r).astype(jnp.float32)),
                                                n]),
               "rewards/margins": jnp.stack([jnp.sum(reward_c - reward_r), n]),
               "logps/chosen": jnp.stack([jnp.sum(jax.lax.stop_gradient(chosen)), n]),
               "logps/rejected": jnp.stack([jnp.sum(jax.lax.stop_gradient(rejected)), n]),
               "entropy": jnp.stack([jnp.sum(jax.lax.stop_gradient(ent)), jnp.sum(counts)])}
    return jnp.mean(losses) / micro_batches, metrics


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """The DPO objective for `rl_step.loss_and_grads` / `update_step` (hashable)."""

    step: StepConfig
    loss: DPOLossConfig

    def __call__(self, frozen: Params, micro_batches: int, lora: Params,
                 mb: dict[str, jax.Array], dropout_key: jax.Array | None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return dpo_micro_loss(self.step, self.loss, frozen, micro_batches, lora, mb, dropout_key)


@functools.partial(jax.jit, static_argnames=("cfg",))
def reference_logprob_sums(frozen: Params, input_ids: jax.Array, attention_mask: jax.Array,
                           completion_mask: jax.Array, *, cfg: StepConfig) -> jax.Array:
    """The reference's (adapters off) completion log-prob sums [2B] of one micro-batch."""
    return sequence_logprob_sums(cfg, frozen, None, input_ids, attention_mask,
                                 completion_mask)[0]
