"""What makes a model family: how its config.json reads and writes, and its PEFT defaults.

Tensor names follow one rule for every family (see `converters/names.py`); a family lists only
the named transforms that differ from identity.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from fastlora_jax.config import ModelConfig, _Reader


@dataclasses.dataclass(frozen=True)
class Family:
    """A supported `model_type`.

    parse_config: reads the family's keys from a config reader and returns ModelConfig fields.
    unparse_config: the inverse, HF keys for a ModelConfig (harmless extras are added by the caller).
    architecture: the HF class name written to `architectures`.
    default_target_modules: LoRA targets when the user gives none (Unsloth's: all projections).
    peft_default_target_modules: what PEFT itself targets when `target_modules` is null (PEFT's
      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING); None where PEFT has no entry.
    harmless_keys: config.json keys of this family that do not change the math (kept verbatim
      in `extras`), beyond the global `config.HARMLESS_KEYS`.
    """

    model_type: str
    architecture: str
    parse_config: Callable[["_Reader"], dict[str, Any]]
    unparse_config: Callable[["ModelConfig"], dict[str, Any]]
    default_target_modules: tuple[str, ...]
    peft_default_target_modules: tuple[str, ...] | None
    harmless_keys: frozenset[str] = frozenset()
