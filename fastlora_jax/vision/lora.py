"""Which modules of a vision-language model get adapters: Unsloth's four switches, or PEFT's
`target_modules` matched on the HF module names.

The text decoder and the vision tower each get a `LoraSpec` over their own stacked layers (so
the LoRA tree, the adapted projection and merging are lora/'s, unchanged). Full module names
are the ones PEFT sees on the transformers class: `{language_prefix}.layers.{i}.self_attn.q_proj`
and `{vision_layers}.{i}.self_attn.q_proj` (fc1 / fc2 for a CLIP / SigLIP MLP). The projector,
the embeddings and lm_head are never targeted, as in Unsloth.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from fastlora_jax.errors import ConfigError
from fastlora_jax.lora.spec import LoraConfig, LoraSpec, projections, resolve_modules
from fastlora_jax.vision.arch import VisionArch


@dataclasses.dataclass(frozen=True)
class VisionLoraSpec:
    """The resolved adapters of both parts (None: that part has none). `config` is what
    adapter_config.json says: its `target_modules` matches exactly the adapted modules."""

    config: LoraConfig
    language: LoraSpec | None
    vision: LoraSpec | None


def language_name(arch: VisionArch, layer: int, group: str, name: str) -> str:
    return f"{arch.language_prefix}.layers.{layer}.{group}.{name}"


def vision_name(arch: VisionArch, layer: int, group: str, name: str) -> str:
    return f"{arch.vision_layers}.{layer}.{group}.{name}"


def _part_regex(prefix: str, modules: list[tuple[str, str]]) -> str:
    names = "|".join(re.escape(f"{g}.{n}") for g, n in modules)
    return rf"{re.escape(prefix)}\.\d+\.(?:{names})"


def flags_regex(arch: VisionArch, config: Any, *, vision: bool, language: bool,
                attention: bool, mlp: bool) -> str:
    """A `target_modules` regex (PEFT full-matches it on each module name) selecting the
    attention and / or MLP projections of the vision and / or language layers."""
    if not (vision or language):
        raise ConfigError("finetune_vision_layers and finetune_language_layers are both False: "
                          "nothing would be trained; enable at least one")
    if not (attention or mlp):
        raise ConfigError("finetune_attention_modules and finetune_mlp_modules are both False: "
                          "nothing would be trained; enable at least one")

    def keep(modules: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        return [(g, n) for g, n in modules if (g == "mlp" and mlp) or (g != "mlp" and attention)]

    parts = []
    if language:
        parts.append(_part_regex(f"{arch.language_prefix}.layers", keep(projections(config.text))))
    if vision:
        parts.append(_part_regex(arch.vision_layers, keep(arch.vision_projections)))
    return "(?:" + "|".join(parts) + ")"


def _spec(config: LoraConfig, modules: tuple[tuple[str, str], ...], num_layers: int,
          full_name: Any) -> LoraSpec | None:
    entries = resolve_modules(config, config.target_modules, modules, num_layers, full_name)
    return LoraSpec(config=config, modules=entries) if entries else None


def resolve_vision_lora(arch: VisionArch, config: Any, lora_config: LoraConfig) -> VisionLoraSpec:
    """Both parts' specs for `lora_config` (its target_modules already set: a list of names or
    a regex, matched as PEFT does on the full module names)."""
    if lora_config.use_dora:
        raise ConfigError("use_dora=True is not supported for vision-language models yet; "
                          "use plain LoRA")
    language = _spec(lora_config, projections(config.text), config.text.num_layers,
                     lambda i, g, n: language_name(arch, i, g, n))
    # The tower's adapters draw their A matrices from another stream than the text model's.
    vision_cfg = dataclasses.replace(lora_config, random_state=lora_config.random_state + 1)
    vision = _spec(vision_cfg, arch.vision_projections, config.vision.num_layers,
                   lambda i, g, n: vision_name(arch, i, g, n))
    if language is None and vision is None:
        raise ConfigError(
            f"target_modules={lora_config.target_modules!r} matches no module of this "
            f"{arch.model_type!r} model; names look like "
            f"{language_name(arch, 0, 'self_attn', 'q_proj')!r} and "
            f"{vision_name(arch, 0, *arch.vision_projections[0])!r}")
    return VisionLoraSpec(config=lora_config, language=language, vision=vision)
