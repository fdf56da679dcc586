"""Qwen2.5-VL's vision tower against transformers' Qwen2_5_VisionTransformerPretrainedModel
(torch, float32) on a tiny random checkpoint, with pixel rows from the checkpoint's own image
processor (transformers' Qwen2VLImageProcessor, run here: the reference environment has no
Pillow) for a square and a non-square picture, alone and together (two images in one call).

The tiny tower has windows of 2 x 2 merge blocks over grids of 6 x 6 and 5 x 9 merge blocks, so
windows are cut at the right and bottom edges, and two of its four blocks attend over the whole
frame.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fastlora_jax.models.decoder import get_path, set_path
from fastlora_jax.vision.qwen2_5_vit import (encode, parse_vision_config, tower_tensor_name,
                                              tower_tensor_path, vision_layout,
                                              vision_param_specs)
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
              patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
              fullatt_block_indexes=[1, 3], initializer_range=0.2)
PROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64,
                 max_pixels=64 * 64 * 4)
SIZES = ((48, 48), (40, 72))  # (height, width): square, then non-square

BUILD = """
import torch, transformers
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel)
torch.manual_seed(0)
cfg = transformers.Qwen2_5_VLVisionConfig(**ARGS["vision"])
model = Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name or "ln_q" in name or name.endswith("bias"):
            p.add_(0.3 * torch.randn_like(p))     # non-trivial norms and biases
model.save_pretrained(ARGS["folder"], safe_serialization=True)
for name in ARGS["cases"]:
    with torch.no_grad():
        out = model(torch.from_numpy(INPUTS[name + "/pixels"]),
                    grid_thw=torch.from_numpy(INPUTS[name + "/grid"]))
    OUTPUTS[name] = out.pooler_output.numpy()
"""


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A picture with structure (a gradient, a disc and a bar in random colours), uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([255 * yy / height, 255 * xx / width, np.full_like(yy, 90.0)], -1)
    cy, cx, r = rng.integers(0, height), rng.integers(0, width), min(height, width) / 4
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    img[height // 3: height // 3 + 5, :] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def load_vision_params(folder: pathlib.Path, config) -> dict:
    """The tower's parameter tree from the saved safetensors (blocks stacked)."""
    tensors = load_file(str(folder / "model.safetensors"))
    specs = {spec.path: spec for spec in vision_param_specs(config)}
    layers: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    params: dict = {}
    for name, value in tensors.items():
        path, layer = tower_tensor_path(name)
        assert path in specs and tower_tensor_name(path, layer) == name, name
        if layer is None:
            set_path(params, path, value)
        else:
            layers.setdefault(path, {})[layer] = value
    for path, by_layer in layers.items():
        set_path(params, path, np.stack([by_layer[i] for i in range(config.depth)]))
    for path, spec in specs.items():
        assert get_path(params, path).shape == spec.shape, path
    return params


def test_vision_tower_matches_transformers(tmp_path):
    """Pixels from the checkpoint's image processor (saved with it, read back by
    AutoImageProcessor), the same arrays into both towers."""
    import json

    from PIL import Image
    from transformers import AutoImageProcessor, Qwen2VLImageProcessor

    Qwen2VLImageProcessor(**PROCESSOR).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pictures = [Image.fromarray(picture(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    arrays = {}
    for name, subset in (("one", pictures[:1]), ("two", pictures)):
        batch = processor(images=subset, return_tensors="np")
        arrays[name + "/pixels"] = np.asarray(batch["pixel_values"], np.float32)
        arrays[name + "/grid"] = np.asarray(batch["image_grid_thw"], np.int64)
    # the non-square picture is 10 x 18 patches: windows are cut at the right and bottom edges
    assert arrays["two/grid"].tolist() == [[1, 12, 12], [1, 10, 18]]
    ref = run_reference(BUILD, arrays, vision=VISION, folder=str(tmp_path),
                        cases=["one", "two"])
    config = parse_vision_config(json.loads((tmp_path / "config.json").read_text()),
                                 "config.json")
    assert config.fullatt_block_indexes == (1, 3) and config.window_units == 2
    params = load_vision_params(tmp_path, config)
    run = jax.jit(lambda p, x, layout: encode(config, p, x, layout))
    for name in ("one", "two"):
        grid = arrays[name + "/grid"]
        layout = vision_layout(config, grid.tolist())
        ours = np.asarray(run(params, arrays[name + "/pixels"], layout))
        assert ours.shape == ref[name].shape == (int(grid.prod(-1).sum()) // 4, 24)
        np.testing.assert_allclose(ours, ref[name], atol=1e-4, rtol=0)
        assert np.abs(ref[name]).max() > 0.5  # not a comparison of near-zeros
