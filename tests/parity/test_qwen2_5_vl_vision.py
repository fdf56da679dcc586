"""Qwen2.5-VL's vision tower against transformers' Qwen2_5_VisionTransformerPretrainedModel
(torch, float32) on a tiny random checkpoint, with pixel rows from the checkpoint's own image
processor for a square and a non-square picture, alone and together (two images in one call).

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

from fastlora_jax.models.decoder import set_path
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
import json, pathlib, torch, transformers
from transformers import AutoImageProcessor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from PIL import Image
torch.manual_seed(0)
cfg = transformers.Qwen2_5_VLVisionConfig(**ARGS["vision"])
model = Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name or "ln_q" in name or name.endswith("bias"):
            p.add_(0.3 * torch.randn_like(p))     # non-trivial norms and biases
folder = pathlib.Path(ARGS["folder"])
model.save_pretrained(folder, safe_serialization=True)
Qwen2VLImageProcessorPil(**ARGS["processor"]).save_pretrained(folder)
processor = AutoImageProcessor.from_pretrained(folder)
images = [Image.fromarray(INPUTS[f"image{i}"]) for i in range(ARGS["n_images"])]
for name, subset in (("one", images[:1]), ("two", images)):
    batch = processor(images=subset, return_tensors="pt")
    OUTPUTS[name + "/pixels"] = batch["pixel_values"].numpy()
    OUTPUTS[name + "/grid"] = batch["image_grid_thw"].numpy()
    with torch.no_grad():
        out = model(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    OUTPUTS[name + "/embeds"] = out.pooler_output.numpy()
OUTPUTS["config"] = np.array(json.dumps(json.loads((folder / "config.json").read_text())))
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
    assert sorted(map(str, jax.tree.leaves(jax.tree.map(np.shape, params)))) == sorted(
        map(str, (spec.shape for spec in specs.values())))
    return params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vit")
    images = {f"image{i}": picture(h, w, i) for i, (h, w) in enumerate(SIZES)}
    ref = run_reference(BUILD, images, vision=VISION, processor=PROCESSOR, folder=str(folder),
                        n_images=len(SIZES))
    return folder, images, ref


def test_vision_tower_matches_transformers(reference):
    import json

    from transformers import AutoImageProcessor
    from PIL import Image

    folder, images, ref = reference
    hf = json.loads(str(ref["config"]))
    config = parse_vision_config(hf, "config.json")
    assert config.fullatt_block_indexes == (1, 3) and config.window_units == 2
    params = load_vision_params(folder, config)
    processor = AutoImageProcessor.from_pretrained(folder)
    pictures = [Image.fromarray(images[f"image{i}"]) for i in range(len(SIZES))]
    run = jax.jit(lambda p, x, layout: encode(config, p, x, layout))
    for name, subset in (("one", pictures[:1]), ("two", pictures)):
        batch = processor(images=subset, return_tensors="np")
        grid = np.asarray(batch["image_grid_thw"])
        np.testing.assert_array_equal(grid, ref[name + "/grid"])
        np.testing.assert_allclose(batch["pixel_values"], ref[name + "/pixels"], atol=1e-6, rtol=0)
        layout = vision_layout(config, grid.tolist())
        ours = np.asarray(run(params, np.asarray(batch["pixel_values"], np.float32), layout))
        expected = ref[name + "/embeds"]
        assert ours.shape == expected.shape == (int(grid.prod(-1).sum()) // 4, 24)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
        assert np.abs(expected).max() > 0.5  # not a comparison of near-zeros
    # the non-square grid is 10 x 18 patches: windows cut at the edges
    assert ref["two/grid"].tolist() == [[1, 12, 12], [1, 10, 18]]
