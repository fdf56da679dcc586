"""HF tensor names <-> our parameter paths, and the named transforms between them.

One rule for every family: drop the leading `model.`; `model.layers.{i}.<rest>` is layer i of the
stacked parameter `("layers", *rest.split("."))`; anything else splits on dots
(`lm_head.weight` -> `("lm_head", "weight")`). A family whose on-disk layout differs from ours
names a transform per parameter in `Family.tensor_transforms`; the transforms live here, each with
its inverse, so loading and exporting stay exact mirrors.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# name -> (to ours, to HF). Each takes and returns a numpy array of one layer's tensor.
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (lambda a: a, lambda a: a),
}


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
