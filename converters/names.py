"""HF tensor names <-> our parameter paths.

One rule for every family: drop the leading `model.`; `model.layers.{i}.<rest>` is layer i of the
stacked parameter `("layers", *rest.split("."))`; anything else splits on dots
(`lm_head.weight` -> `("lm_head", "weight")`). Every supported family stores its tensors exactly
as we compute with them (Phi-3's fused qkv_proj / gate_up_proj stay fused, Gemma's norm offsets
are applied in the math), so no per-tensor value transform is needed: loading and exporting are
this one rule read in two directions. A future family whose layout differs would add a named
transform and its inverse here.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_path(name: str) -> tuple[tuple[str, ...], int | None]:
    """`model.layers.3.mlp.up_proj.weight` -> (("layers", "mlp", "up_proj", "weight"), 3)."""
    m = _LAYER.match(name)
    if m:
        return ("layers",) + tuple(m.group(2).split(".")), int(m.group(1))
    if name.startswith("model."):
        name = name[len("model."):]
    return tuple(name.split(".")), None


def path_to_hf(path: tuple[str, ...], layer: int | None) -> str:
    """Inverse of `hf_to_path`."""
    if path[0] == "layers":
        return f"model.layers.{layer}." + ".".join(path[1:])
    if path[0] == "lm_head":
        return ".".join(path)
    return "model." + ".".join(path)
