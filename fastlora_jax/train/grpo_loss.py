"""The GRPO objective and its jit'd step, with TRL's loss types and importance-sampling levels.

One micro-batch holds B completions laid out as in `train/logprobs.py`:
  input_ids, attention_mask  [B, P + C]   left-padded prompt + right-padded completion
  completion_mask            [B, C]       1 on completion tokens that count in the loss
  advantages                 [B]          group-normalised rewards
  old_logps                  [B, C]       the sampling policy's log-probs (when num_iterations > 1
                                          or generation and updates are not aligned)
  ref_logps                  [B, C]       the reference's log-probs (beta > 0)
  dapo_normalizer            []           dapo: loss tokens of the generation batch, rescaled to
                                          one optimizer step (TRL's `num_items_in_batch` rule)

Per token: ratio r = exp(logp - old_logp) (token level) or exp(mean over the completion) (sequence
level, GSPO); loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * KL with the k3
estimator KL = exp(ref - logp) - (ref - logp) - 1, times r when use_bias_correction_kl. Aggregation by loss_type:
  grpo     mean over sequences of each sequence's token mean
  bnpo     token mean over the micro-batch
  dr_grpo  token sum / (B * max_completion_length)
  dapo     token sum / dapo_normalizer
grpo, bnpo and dr_grpo are divided by the number of micro-batches, so the step's loss is their sum.
`GRPOObjective` plugs this into the shared jit'd step (`train/rl_step.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fastlora_jax.models.decoder import Params
from fastlora_jax.train.logprobs import completion_logprobs
from fastlora_jax.train.step import StepConfig

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """The static knobs of the objective (hashable: a jit static argument)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    max_completion_length: int = 256
    use_bias_correction_kl: bool = True


def grpo_token_terms(lcfg: GRPOLossConfig, logp: jax.Array, mb: dict[str, jax.Array]
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-token loss [B, C] or [B, 1]-broadcast, metric sums) from the policy's log-probs."""
    mask = mb["completion_mask"].astype(jnp.float32)
    adv = mb["advantages"].astype(jnp.float32)[:, None]                          # [B, 1]
    old = mb.get("old_logps")
    old = jax.lax.stop_gradient(logp) if old is None else old
    log_ratio = logp - old
    if lcfg.importance_sampling_level == "token":
        log_w = log_ratio                                                         # [B, C]
    else:
        log_w = (jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]
    coef_1 = jnp.exp(log_w)
    coef_2 = jnp.clip(coef_1, 1 - lcfg.epsilon_low, 1 + lcfg.epsilon_high)
    unclipped = coef_1 if lcfg.delta is None else jnp.minimum(coef_1, lcfg.delta)
    per_token = -jnp.minimum(unclipped * adv, coef_2 * adv)
    metrics: dict[str, jax.Array] = {}

    def masked_sums(x: jax.Array) -> jax.Array:
        """[sum, count] as TRL's global masked mean takes them (one value per sequence when the
        ratio is a sequence's)."""
        if x.shape[1] == 1:
            return jnp.stack([jnp.sum(x), jnp.float32(x.shape[0])])
        return jnp.stack([jnp.sum(x * mask), jnp.sum(mask)])

    if lcfg.beta != 0.0:
        diff = mb["ref_logps"] - logp
        per_token_kl = jnp.exp(diff) - diff - 1.0
        if lcfg.use_bias_correction_kl:  # the unbiased reverse-KL gradient (TRL's default)
            per_token_kl = per_token_kl * coef_1
        per_token = per_token + lcfg.beta * per_token_kl
        metrics["kl"] = masked_sums(jax.lax.stop_gradient(per_token_kl))
    low = ((coef_1 < 1 - lcfg.epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((coef_1 > 1 + lcfg.epsilon_high) & (adv > 0)).astype(jnp.float32)
    metrics["clip_ratio/low_mean"] = masked_sums(jax.lax.stop_gradient(low))
    metrics["clip_ratio/high_mean"] = masked_sums(jax.lax.stop_gradient(high))
    metrics["clip_ratio/region_mean"] = masked_sums(jax.lax.stop_gradient(
        jnp.maximum(low, high)))
    return jnp.broadcast_to(per_token, logp.shape), metrics


def aggregate(lcfg: GRPOLossConfig, per_token: jax.Array, mask: jax.Array,
              dapo_normalizer: jax.Array, micro_batches: int) -> jax.Array:
    """The micro-batch's share of the step loss, by loss_type (see the module docstring)."""
    mask = mask.astype(jnp.float32)
    masked = per_token * mask
    if lcfg.loss_type == "grpo":
        loss = jnp.mean(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    elif lcfg.loss_type == "bnpo":
        loss = jnp.sum(masked) / jnp.maximum(jnp.sum(mask), 1.0)
    elif lcfg.loss_type == "dr_grpo":
        loss = jnp.sum(masked) / (per_token.shape[0] * lcfg.max_completion_length)
    else:
        return jnp.sum(masked) / jnp.maximum(dapo_normalizer, 1.0)
    return loss / micro_batches


def grpo_micro_loss(cfg: StepConfig, lcfg: GRPOLossConfig, frozen: Params, micro_batches: int,
                    lora: Params, mb: dict[str, jax.Array], dropout_key: jax.Array | None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss share, metric sums) of one micro-batch of completions."""
    width = mb["completion_mask"].shape[1]
    logp, entropy = completion_logprobs(cfg, frozen, lora, mb["input_ids"], mb["attention_mask"],
                                        width, temperature=lcfg.temperature,
                                        dropout_key=dropout_key)
    per_token, metrics = grpo_token_terms(lcfg, logp, mb)
    loss = aggregate(lcfg, per_token, mb["completion_mask"], mb["dapo_normalizer"], micro_batches)
    mask = mb["completion_mask"].astype(jnp.float32)
    metrics["entropy"] = jnp.stack([jnp.sum(jax.lax.stop_gradient(entropy) * mask),
                                    jnp.sum(mask)])
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The GRPO objective for `rl_step.loss_and_grads` / `update_step` (hashable)."""

    step: StepConfig
    loss: GRPOLossConfig

    def __call__(self, frozen: Params, micro_batches: int, lora: Params,
                 mb: dict[str, jax.Array], dropout_key: jax.Array | None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return grpo_micro_loss(self.step, self.loss, frozen, micro_batches, lora, mb,
                               dropout_key)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "completion_width"))
def score_completions(lora: Params | None, frozen: Params, input_ids: jax.Array,
                      attention_mask: jax.Array, *, cfg: StepConfig, temperature: float,
                      completion_width: int) -> jax.Array:
    """Log-probs [B, C] without gradients: the old policy (`lora`) or the reference (None)."""
    logp, _ = completion_logprobs(cfg, frozen, lora, input_ids, attention_mask,
                                  completion_width, temperature=temperature)
    return logp
