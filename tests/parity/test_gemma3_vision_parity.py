"""Gemma 3 with images against transformers (torch, float32) on a tiny random checkpoint saved
with its processor: logits with two real images of different sizes, where each image's tokens
attend to each other both ways (with the block longer than the sliding window, so the window's
bound inside a block is exercised too), and with the blocks switched off the logits differ."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from fastlora_jax.vision import FastVisionModel
from fastlora_jax.vision.model import forward
from fastlora_jax.testing.vision import build_gemma3, hf_logits, images

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_gemma3(tmp_path_factory.mktemp("gemma3") / "ckpt")


def test_gemma3_logits_match_transformers(gemma3_dir: pathlib.Path) -> None:
    import dataclasses

    model, processor = FastVisionModel.from_pretrained(gemma3_dir, dtype="float32")
    content = [{"type": "image"}, {"type": "text", "text": "Describe."}, {"type": "image"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    out = processor(text=[text], images=images(((40, 30), (17, 23))), return_tensors="np")
    inputs = {k: np.asarray(out[k]) for k in ("input_ids", "attention_mask", "pixel_values")}
    blocks = (inputs["input_ids"] == model.config.image_token_id)
    assert blocks.sum() == 2 * model.config.mm_tokens_per_image
    ours = np.asarray(model(**inputs))
    ref = hf_logits(gemma3_dir, dict(inputs, token_type_ids=blocks.astype(np.int64)),
                    cls="Gemma3ForConditionalGeneration")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # the bidirectional blocks matter: a causal-only forward differs inside the images
    causal = dataclasses.replace(model.arch, image_blocks=False)
    plain = np.asarray(forward(causal, model.config, None, model.frozen, None,
                               model.batch(inputs)))
    assert np.abs(plain - ours).max() > 1e-3
