"""LoRA configuration and which modules it targets, with PEFT's matching rules.

`LoraConfig` carries PEFT's argument names and meaning. `resolve(config, model_config)` turns it
into a `LoraSpec`: for each targeted projection (e.g. `("self_attn", "q_proj")`), the rank and scale
of every layer (0 where the layer is not targeted). Module names are matched as PEFT does on the
full HF name `model.layers.{i}.self_attn.q_proj`: a list entry matches the exact name or a
`.entry` suffix; a string is a `re.fullmatch` regex. rank/alpha patterns use PEFT's
`re.match(rf"(.*\\.)?({key})$", name)`, first key wins.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

from fastlora_jax.config import ModelConfig
from fastlora_jax.errors import ConfigError

# The trainable projections of a llama-style block: (group, name). Embeddings and lm_head are not
# LoRA targets. A fused family (Phi-3) has qkv_proj / gate_up_proj instead: see `projections`.
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
               ("mlp", "down_proj"))
NOT_SUPPORTED_TARGETS = ("lm_head", "embed_tokens")


def projections(model_config: ModelConfig) -> tuple[tuple[str, str], ...]:
    """The LoRA-targetable projections of one block of `model_config`, with HF's module names."""
    attn = ((("self_attn", "qkv_proj"),) if model_config.fused_qkv else
            (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")))
    mlp = ((("mlp", "gate_up_proj"),) if model_config.fused_gate_up else
           (("mlp", "gate_proj"), ("mlp", "up_proj")))
    return attn + (("self_attn", "o_proj"),) + mlp + (("mlp", "down_proj"),)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's LoraConfig fields that we implement (same names, same defaults as Unsloth's call)."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    init_lora_weights: bool | str = True
    random_state: int = 3407

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA r={self.r!r} must be a positive int (e.g. 8, 16, 64)")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} must be a positive number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: only bias='none' is supported (the frozen "
                              f"biases stay frozen, as Unsloth does)")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} must be True, False "
                              f"or 'gaussian'")
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str) and not (
                isinstance(targets, tuple) and all(isinstance(t, str) for t in targets)):
            raise ConfigError(f"target_modules={targets!r} must be a list of module names, a "
                              f"regex string, or None")
        patterns = [("target_modules", targets)] if isinstance(targets, str) else []
        for field, pairs in (("rank_pattern", self.rank_pattern),
                             ("alpha_pattern", self.alpha_pattern)):
            for key, _ in pairs:
                if not isinstance(key, str):
                    raise ConfigError(f"{field} key {key!r} must be a string (a module regex)")
                patterns.append((f"{field} key", key))
        for what, pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{what} {pattern!r} is not a valid regular expression "
                                  f"({err})") from None
        for key, value in self.rank_pattern:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}]={value!r} must be a positive int")
        for key, value in self.alpha_pattern:
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"alpha_pattern[{key!r}]={value!r} must be a positive number")

    @classmethod
    def create(cls, *, target_modules: Sequence[str] | str | None = None,
               rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None, **kwargs: Any) -> "LoraConfig":
        """Build from PEFT-style arguments (lists and dicts)."""
        if target_modules is not None and not isinstance(target_modules, str):
            target_modules = tuple(target_modules)
        return cls(target_modules=target_modules,
                   rank_pattern=tuple((rank_pattern or {}).items()),
                   alpha_pattern=tuple((alpha_pattern or {}).items()), **kwargs)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Resolved targets: `modules[(group, name)] = (ranks per layer, scales per layer)`.

    A layer that is not targeted has rank 0 and scale 0.0; stacked A/B arrays use the max rank of
    the projection and are zero beyond a layer's own rank (those entries get zero gradients).
    """

    config: LoraConfig
    modules: tuple[tuple[tuple[str, str], tuple[int, ...], tuple[float, ...]], ...]

    def max_rank(self, module: tuple[str, str]) -> int:
        return max(self.entry(module)[0])

    def entry(self, module: tuple[str, str]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        for key, ranks, scales in self.modules:
            if key == module:
                return ranks, scales
        raise KeyError(module)

    @property
    def targets(self) -> tuple[tuple[str, str], ...]:
        return tuple(key for key, _, _ in self.modules)


def hf_module_name(layer: int, group: str, name: str) -> str:
    return f"model.layers.{layer}.{group}.{name}"


def _matches(target: tuple[str, ...] | str, module_name: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target)


def _pattern_value(patterns: tuple[tuple[str, Any], ...], module_name: str, default: Any) -> Any:
    for key, value in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def resolve_modules(config: LoraConfig, target: tuple[str, ...] | str,
                    modules: Sequence[tuple[str, str]], num_layers: int,
                    full_name: Callable[[int, str, str], str]
                    ) -> tuple[tuple[tuple[str, str], tuple[int, ...], tuple[float, ...]], ...]:
    """`LoraSpec.modules` entries of the (group, name) `modules` of `num_layers` stacked layers
    that `target` matches on their full names `full_name(layer, group, name)`, with ranks and
    scales from `config` (and its rank / alpha patterns); unmatched modules are left out."""
    out = []
    for group, name in modules:
        ranks, scales = [], []
        for layer in range(num_layers):
            full = full_name(layer, group, name)
            if _matches(target, full):
                r = _pattern_value(config.rank_pattern, full, config.r)
                alpha = _pattern_value(config.alpha_pattern, full, config.lora_alpha)
                ranks.append(r)
                scales.append(config.scale(r, alpha))
            else:
                ranks.append(0)
                scales.append(0.0)
        if any(ranks):
            out.append(((group, name), tuple(ranks), tuple(scales)))
    return tuple(out)


def resolve(config: LoraConfig, model_config: ModelConfig,
            default_targets: Sequence[str]) -> LoraSpec:
    """Which projections of which layers get adapters, with their ranks and scales."""
    target = config.target_modules if config.target_modules is not None else tuple(default_targets)
    names = target if isinstance(target, tuple) else (target,)
    available = projections(model_config)
    for bad in NOT_SUPPORTED_TARGETS:
        if any(t == bad or t.endswith("." + bad) for t in names):
            what = "DoRA" if config.use_dora else "LoRA"
            raise ConfigError(f"target_modules names {bad!r}: {what} on {bad} is not supported; "
                              f"target the projections {[n for _, n in available]}")
    modules = resolve_modules(config, target, available, model_config.num_layers,
                              hf_module_name)
    if not modules:
        raise ConfigError(f"target_modules={target!r} matches no module of this "
                          f"{model_config.model_type!r} model; available names: "
                          f"{sorted(n for _, n in available)} "
                          f"(full names look like {hf_module_name(0, 'self_attn', 'q_proj')!r})")
    return LoraSpec(config=config, modules=tuple(modules))
