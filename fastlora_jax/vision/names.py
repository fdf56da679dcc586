"""Stored tensor names of the llava-style checkpoints (LLaVA, Gemma 3) <-> our two trees.

Both spellings transformers has written are read:
  model.language_model.<text>   or  language_model.model.<text>   (the text decoder)
  lm_head.weight                or  language_model.lm_head.weight
  model.vision_tower[.vision_model].<tower>   (or without `model.`)
  model.multi_modal_projector.<projector>     (or without `model.`)
Exports write the first spelling, transformers 5's module names. A tower's `encoder.layers.{i}.`
becomes layer i of the stacked `tower.layers.` tree; SigLIP's pooling head (`head.`) is never
read (no vision-language model uses it).
"""

from __future__ import annotations

import re

from fastlora_jax.errors import CheckpointError

_TEXT = re.compile(r"^(?:model\.language_model\.|language_model\.model\.)(.+)$")
_HEAD = re.compile(r"^(?:language_model\.)?lm_head\.weight$")
_TOWER = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")
_PROJ = re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def tower_part(rest: str) -> str | None:
    """A tower tensor name below its root -> our vision path ("tower.layers.3.mlp.fc1.weight"),
    or None for SigLIP's pooling head."""
    if rest.startswith("head."):
        return None
    m = _LAYER.match(rest)
    return f"tower.layers.{m.group(1)}.{m.group(2)}" if m else f"tower.{rest}"


def tensor_part(name: str, what: str = "llava-style") -> tuple[str, str] | None:
    """("language", the text model's HF name) / ("vision", our vision path) / None (ignored)."""
    if _HEAD.match(name):
        return "language", "lm_head.weight"
    if m := _TEXT.match(name):
        return "language", "model." + m.group(1)
    if m := _TOWER.match(name):
        local = tower_part(m.group(1))
        return None if local is None else ("vision", local)
    if m := _PROJ.match(name):
        return "vision", "projector." + m.group(1)
    raise CheckpointError(f"tensor {name!r} is not part of a {what} checkpoint (expected names "
                          f"under model.language_model., model.vision_tower., "
                          f"model.multi_modal_projector. or lm_head.)")


def tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """The exported HF name of a vision-tree path (with its layer when stacked)."""
    if path[0] == "projector":
        return "model.multi_modal_projector." + ".".join(path[1:])
    if path[1] == "layers":
        return f"model.vision_tower.encoder.layers.{layer}." + ".".join(path[2:])
    return "model.vision_tower." + ".".join(path[1:])
