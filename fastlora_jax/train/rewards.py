"""Reward functions and group-relative advantages, with TRL's conventions.

A reward function is called as `f(prompts=..., completions=..., completion_ids=..., **columns)`
with one entry per completion (each prompt repeated num_generations times) and every other
dataset column as a keyword list; it returns one float per completion, or None where it does
not score that sample. Conversational prompts get conversational completions
(`[{"role": "assistant", "content": text}]`).
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from fastlora_jax.errors import ConfigError, DataError

RewardFunc = Callable[..., Sequence[float | None]]


def reward_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def score(funcs: Sequence[RewardFunc], prompts: list[Any], completions: list[Any],
          completion_ids: list[list[int]], columns: dict[str, list[Any]]) -> np.ndarray:
    """[N, F] float64 rewards (NaN where a function returned None). One clear error when a
    function raises, returns the wrong number of values, or scores nothing at all."""
    n = len(completions)
    out = np.full((n, len(funcs)), np.nan)
    for j, func in enumerate(funcs):
        name = reward_name(func)
        try:
            values = func(prompts=prompts, completions=completions,
                          completion_ids=completion_ids, **columns)
        except Exception as err:  # a user's function: report which one and on what
            raise DataError(f"reward function {name!r} raised {type(err).__name__}: {err} "
                            f"(batch of {n} completions; first prompt {prompts[0]!r}, first "
                            f"completion {completions[0]!r})") from err
        values = list(values) if values is not None else []
        if len(values) != n:
            raise DataError(f"reward function {name!r} returned {len(values)} rewards for {n} "
                            f"completions; it must return one value (or None) per completion")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                out[i, j] = float(v)
            except (TypeError, ValueError):
                raise DataError(f"reward function {name!r} returned {v!r} for completion {i} "
                                f"({completions[i]!r}); expected a number or None") from None
        if np.all(np.isnan(out[:, j])):
            raise DataError(f"reward function {name!r} returned None for all {n} completions "
                            f"(first prompt {prompts[0]!r}); it must score at least one")
    return out


def advantages(rewards_per_func: np.ndarray, weights: np.ndarray, num_generations: int,
               scale_rewards: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TRL's sum-then-normalise: (advantages [N], total rewards [N] (NaN: unscored), std used).

    Rewards are weighted and summed (NaN-aware); a completion no function scored is left out of
    its group's mean/std and gets advantage 0. scale_rewards: "group" divides by the group's
    std (Bessel-corrected), "batch" by the whole batch's, "none" not at all (std + 1e-4).
    """
    unscored = np.all(np.isnan(rewards_per_func), axis=1)
    total = np.nansum(rewards_per_func * weights[None, :], axis=1)
    total[unscored] = np.nan
    grouped = total.reshape(-1, num_generations)
    mean = np.repeat(_nanmean(grouped, axis=1), num_generations)
    if scale_rewards == "batch":
        std = np.full_like(total, nanstd(total))
    else:
        std = np.repeat(nanstd(grouped, axis=1), num_generations)
    adv = total - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0), total, std


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    count = np.sum(~np.isnan(x), axis=axis)
    return np.where(count > 0, np.nansum(x, axis=axis) / np.maximum(count, 1), np.nan)


def nanstd(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Bessel-corrected std ignoring NaN (NaN with fewer than two values), as TRL's."""
    count = np.sum(~np.isnan(x), axis=axis)
    mean = _nanmean(x, axis=axis)
    mean_b = mean if axis is None else np.expand_dims(mean, axis)
    var = np.nansum((x - mean_b) ** 2, axis=axis) / np.maximum(count - 1, 1)
    return np.where(count > 1, np.sqrt(var), np.nan)


def load_reward_funcs(specs: Sequence[str | RewardFunc]) -> list[RewardFunc]:
    """Callables as given, or "path/to/file.py:function" strings loaded from that file."""
    funcs = []
    for spec in specs:
        if callable(spec):
            funcs.append(spec)
            continue
        path, _, name = str(spec).rpartition(":")
        if not path or not name:
            raise ConfigError(f"reward function {spec!r} must be 'file.py:function_name'")
        file = pathlib.Path(path)
        if not file.is_file():
            raise ConfigError(f"reward function file {path!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"rewards_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        func = getattr(module, name, None)
        if not callable(func):
            raise ConfigError(f"{path!r} has no function {name!r}")
        funcs.append(func)
    if not funcs:
        raise ConfigError("GRPO needs at least one reward function")
    return funcs
