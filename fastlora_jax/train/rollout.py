"""Rollouts for GRPO: sample completions of token prompts with the KV-cache generation engine.

The trainer sees one function, `sample_completions(cfg, frozen, lora, prompts, params, seed)`,
that returns each completion's token ids (cut after its first EOS, which it keeps). It runs on
the very arrays the update trains — the frozen tree (possibly NF4) and the float32 LoRA tree,
applied unmerged: nothing is merged, copied or dequantized per step. Prompts are left-padded to
the longest one; with the trainer's fixed prompt width and max_completion_length the engine
compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import ConfigError
from fastlora_jax.generation.engine import EngineSpec, completions, generate_jit
from fastlora_jax.generation.sampling import SamplingConfig
from fastlora_jax.models.decoder import Params
from fastlora_jax.train.step import StepConfig


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn: transformers' sampling knobs (top_k 0 and top_p 1.0 are off;
    do_sample False is greedy, for evaluation)."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_completion_length={self.max_new_tokens} must be >= 1")
        self.sampling()  # the generation engine's own checks of temperature, top_k/p, min_p

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(do_sample=self.do_sample, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)


def sample_completions(cfg: StepConfig, frozen: Params, lora: Params | None,
                       prompts: list[list[int]], params: SamplingParams,
                       seed: int) -> list[list[int]]:
    """Sampled completion ids per prompt (up to and including the first EOS)."""
    if not prompts:
        raise ConfigError("no prompts to sample from")
    width = max(len(p) for p in prompts)
    buffer = np.full((len(prompts), width), params.pad_token_id, np.int32)
    for r, p in enumerate(prompts):
        buffer[r, width - len(p):] = p
    start = np.asarray([width - len(p) for p in prompts], np.int32)
    spec = EngineSpec(config=cfg.model, lora_spec=cfg.lora if lora is not None else None,
                      sampling=params.sampling(), cache_len=width + params.max_new_tokens,
                      eos_ids=tuple(params.eos_token_ids), pad_id=params.pad_token_id,
                      attention_impl=cfg.attention_impl)
    state = generate_jit(spec, frozen, lora, jnp.asarray(buffer), jnp.asarray(start),
                         jax.random.key(seed), params.max_new_tokens)
    tokens, mask, _ = completions(state, width, params.max_new_tokens)
    tokens, lengths = np.asarray(tokens), np.asarray(mask).sum(-1)
    return [row[:n].tolist() for row, n in zip(tokens, lengths)]
