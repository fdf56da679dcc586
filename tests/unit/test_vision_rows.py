"""Training rows whose examples hold different numbers of images (0, 1, 2) and, for Qwen2.5-VL,
images of different sizes: each row's image arrays are padded along their first axis (LLaVA-NeXT's
tile axis too), and the
training forward (rows=True, the step's loss) gives every row exactly what the inference forward
gives its example alone, unpadded. Qwen2.5-VL's per-row vision layouts are the unpadded ones
followed by the padding; arrays that differ beyond their first axis are one clear error."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastVisionModel
from fastlora_jax.errors import DataError
from fastlora_jax.models import decoder
from fastlora_jax.testing.vision import (images, mixed_shapes_dataset, randomize_b,
                                         tiny_processor, tiny_vlm_numpy)
from fastlora_jax.train.step import StepConfig, loss_sums
from fastlora_jax.train.vision_data import build_vision_rows
from fastlora_jax.vision import forward as vision_forward
from fastlora_jax.vision.collator import VisionCollator, vision_collator
from fastlora_jax.vision.qwen2_5_vit import VisionLayout, vision_layout
from fastlora_jax.vision.qwen2_5_vl import host_inputs, rope_positions

# Qwen2.5-VL sizes (width, height): grids 6 x 8, 10 x 10 and 12 x 6 patches (non-square)
QWEN_SIZES = ((32, 24), (40, 40), (24, 48))


@functools.partial(jax.jit, static_argnums=(0,))
def _training_forward(cfg: StepConfig, lora, frozen, mb):
    """(logits [B, T, V] of the training forward, the step's loss sum and count)."""
    arch, config = cfg.vision
    h = vision_forward.hidden_states(arch, config, cfg.lora, frozen, lora, mb, rows=True)
    logits = decoder.logits_from_hidden(config.text, frozen["language"], h)
    return logits, loss_sums(cfg, lora, frozen, mb, None)


@pytest.mark.parametrize("model_type", ["llava", "llava_next",
                                        pytest.param("gemma3", marks=pytest.mark.slow),
                                        "qwen2_5_vl"])
def test_padded_rows_equal_each_example_alone(model_type: str, tmp_path: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(
        tiny_vlm_numpy(tmp_path / "ckpt", model_type), dtype="float32")
    FastVisionModel.get_peft_model(model, r=4)
    randomize_b(model)  # both parts' adapters change the logits, but at randomize_b's scale
    # this tiny model is chaotic (1e-6 of pixel noise moves a logit by 3e-3): a tenth of it
    model.set_adapter(model.lora_spec, jax.tree_util.tree_map_with_path(
        lambda path, a: a * 0.1 if path[-1].key == "lora_B" else a, model.lora))
    data = [json.loads(line) for line in mixed_shapes_dataset(
        tmp_path / "data", n=5, sizes=QWEN_SIZES).read_text().splitlines()]
    data = [data[2], data[0], data[1], data[4]]  # 2, 0, 1 and 1 images: padding after each
    collator = vision_collator(model, processor, image_root=tmp_path / "data")
    host = functools.partial(model.arch.host_inputs, model.config) if (
        model.arch.host_inputs) else None
    # LLaVA-NeXT's tiles give an image up to 88 tokens here, and its examples' tile grids differ
    rows, _ = build_vision_rows(collator, data, pad_token_id=0, host_inputs=host,
                                max_seq_length=192 if model_type == "llava_next" else 96)
    pixels = rows["pixel_values"]
    assert pixels.shape[:2] == ((4, pixels.shape[1]) if model_type == "qwen2_5_vl" else (4, 2))
    assert not pixels[1].any()  # the row without images is all padding
    if model_type == "llava_next":  # every image's tiles padded to the largest grid's 4 + base
        assert pixels.shape[2] == model.config.max_tiles == 5
    cfg = StepConfig(model=model.config.text, lora=model.lora_spec, remat=False,
                     vision=(model.arch, model.config))
    mb = {k: jnp.asarray(v) for k, v in rows.items() if k != "segment_ids"}
    logits, (loss, count) = _training_forward(cfg, model.lora, model.frozen, mb)
    ref_loss, ref_count = 0.0, 0
    for r, example in enumerate(data):
        ids, _, arrays = collator.example(example, f"example {r}")
        alone = np.asarray(model(input_ids=np.asarray([ids]), **(arrays or {})))[0]  # [L, V]
        # fp32 summation-order noise of the two batch shapes: ~2e-5 of logits of size ~4
        # (the text-only row shows it too); a feature of the wrong image moves them by ~1
        np.testing.assert_allclose(np.asarray(logits[r, :len(ids)]), alone, atol=1e-4,
                                   rtol=0, err_msg=f"row {r}")
        targets = rows["targets"][r, :len(ids)]
        keep = targets != -100
        logp = jax.nn.log_softmax(jnp.asarray(alone[keep], jnp.float32), axis=-1)
        ref_loss -= float(jnp.take_along_axis(logp, jnp.asarray(targets[keep])[:, None],
                                              axis=1).sum())
        ref_count += int(keep.sum())
    assert int(count) == ref_count
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


def test_qwen_row_layouts_are_the_unpadded_ones_then_padding(tmp_path: pathlib.Path) -> None:
    model, _ = FastVisionModel.from_pretrained(tiny_vlm_numpy(tmp_path, "qwen2_5_vl"),
                                               dtype="float32")
    config, image, text = model.config, model.config.image_token_id, 7
    grids = [[(1, 6, 8), (1, 10, 10)], [(1, 12, 6)], []]   # images per row, in patches
    patches, most = 48 + 100 + 8, 2                         # more rows than any real row needs
    T = 64
    ids = np.full((3, T), text, np.int64)
    grid = np.zeros((3, most, 3), np.int64)
    for r, row in enumerate(grids):
        at = 2
        for i, g in enumerate(row):
            grid[r, i] = g
            n = g[0] * g[1] * g[2] // 4
            ids[r, at:at + n] = image
            at += n + 3
    out = host_inputs(config, {"input_ids": ids, "image_grid_thw": grid,
                               "pixel_values": np.zeros((3, patches, 96), np.float32)})
    mu = config.vision.merge_unit
    for r, row in enumerate(grids):
        padded = VisionLayout(*(out["vision_" + k][r] for k in VisionLayout._fields))
        n = sum(t * h * w for t, h, w in row)
        if row:
            alone = vision_layout(config.vision, row)
            for field, want in alone._asdict().items():
                np.testing.assert_array_equal(getattr(padded, field)[:len(want)], want, field)
            assert padded.window_ids[:n].max() < patches - 1
            assert padded.frame_ids[:n].max() < patches - 1
        np.testing.assert_array_equal(padded.patch_order[n:], np.arange(n, patches))
        np.testing.assert_array_equal(padded.window_ids[n:], patches - 1)
        np.testing.assert_array_equal(padded.frame_ids[n:], patches - 1)
        np.testing.assert_array_equal(padded.token_order[n // mu:],
                                      np.arange(n // mu, patches // mu))
        positions, delta = rope_positions(config, ids[r:r + 1], row or None)
        np.testing.assert_array_equal(out["mrope_positions"][r], positions[:, 0])
        assert out["rope_deltas"][r] == delta[0]


def test_arrays_that_differ_beyond_the_image_count_are_one_error(tmp_path: pathlib.Path) -> None:
    """A LLaVA processor that keeps each image's aspect ratio (no centre crop) gives pixel
    arrays of two sizes: they cannot share a batch, and the error names the example and
    shapes."""
    processor, image_id = tiny_processor()
    processor.image_processor.do_center_crop = False
    collator = VisionCollator(processor=processor, image_token_id=image_id)
    square, wide = images(((28, 28), (40, 28)))
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}], "images": [picture]}
            for picture in (square, wide)]
    with pytest.raises(DataError, match=r"train_dataset, example 1: its images give "
                                        r"'pixel_values' of shape \(1, 3, 28, 40\), but "
                                        r"example 0's give \(1, 3, 28, 28\)"):
        build_vision_rows(collator, rows, max_seq_length=128, pad_token_id=0)
