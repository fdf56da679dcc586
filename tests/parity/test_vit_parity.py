"""CLIP and SigLIP vision towers against transformers' CLIPVisionModel / SiglipVisionModel
(torch, float32) on tiny random checkpoints: every hidden state (`hidden_states[k]`, which
LLaVA reads) and SigLIP's post-normed last hidden state (which Gemma 3 reads)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fastlora_jax.vision.checkpoint import vision_path
from fastlora_jax.vision.names import tower_part
from fastlora_jax.vision.vit import VisionConfig, encode, vision_param_specs
from fastlora_jax.models.decoder import set_path
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

TOWERS = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel",
             dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16)),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel",
               dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False)),
}

REFERENCE = """
import torch, transformers
torch.manual_seed(0)
for name, (config_cls, model_cls, kwargs) in ARGS["towers"].items():
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(ARGS["root"] + "/" + name)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(INPUTS[name]), output_hidden_states=True)
    for k, h in enumerate(out.hidden_states):
        OUTPUTS[f"{name}_hidden_{k}"] = h.numpy()
    OUTPUTS[f"{name}_last"] = out.last_hidden_state.numpy()
"""


def load_tower(folder: pathlib.Path) -> tuple[VisionConfig, dict]:
    """Our config and tree from a saved standalone tower (names below the tower's root)."""
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("architectures", None)
    config = VisionConfig.from_hf(raw, str(folder / "config.json"))
    specs = {s.path: s for s in vision_param_specs(config)}
    stacks: dict = {}
    tree: dict = {}
    for name, value in load_file(str(folder / "model.safetensors")).items():
        local = tower_part(name.removeprefix("vision_model."))
        path, layer = vision_path(local)
        path = path[1:]  # drop "tower"
        if layer is None:
            set_path(tree, path, value)
        else:
            stacks.setdefault(path, np.zeros(specs[path].shape, np.float32))[layer] = value
    for path, value in stacks.items():
        set_path(tree, path, value)
    assert {p for p in specs} == {p for p in specs if _has(tree, p)}
    return config, jax.tree.map(np.asarray, tree)


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if key not in tree:
            return False
        tree = tree[key]
    return True


def test_towers_match_transformers(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    pixels = {name: rng.normal(size=(2, 3, kw["image_size"], kw["image_size"])).astype(np.float32)
              for name, (_, _, kw) in TOWERS.items()}
    ref = run_reference(REFERENCE, pixels, towers=TOWERS, root=str(tmp_path))
    for name in TOWERS:
        config, params = load_tower(tmp_path / name)
        for k in range(config.num_layers + 1):
            ours = np.asarray(encode(config, params, pixels[name], num_layers=k))
            np.testing.assert_allclose(ours, ref[f"{name}_hidden_{k}"], atol=1e-4, rtol=1e-4,
                                       err_msg=f"{name} hidden_states[{k}]")
        if name == "siglip":
            ours = np.asarray(encode(config, params, pixels[name], post_norm=True))
            np.testing.assert_allclose(ours, ref[f"{name}_last"], atol=1e-4, rtol=1e-4)
