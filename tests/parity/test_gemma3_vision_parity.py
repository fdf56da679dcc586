"""Gemma 3 with images against transformers (torch, float32) on a tiny random checkpoint saved
with its processor: logits with two real images of different sizes, where each image's tokens
attend to each other both ways (with the block longer than the sliding window, so the window's
bound inside a block is exercised too; a causal-only forward differs); our PEFT adapter on
`Gemma3ForConditionalGeneration` and the merged export; greedy generation with an image."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.testing.vision import (HF_GENERATE, build_gemma3,
                                        check_peft_and_merged_exports, hf_logits, images)
from fastlora_jax import FastVisionModel
from fastlora_jax.vision.forward import forward

pytestmark = pytest.mark.reference
CLS = "Gemma3ForConditionalGeneration"


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_gemma3(tmp_path_factory.mktemp("gemma3") / "ckpt")


def chat_inputs(processor, pictures: list, image_token_id: int) -> tuple[dict, dict]:
    """(our inputs, transformers' inputs: the same plus token_type_ids marking image tokens)."""
    content = [{"type": "image"}, {"type": "text", "text": "Describe."}]
    content += [{"type": "image"}] * (len(pictures) - 1)
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    out = processor(text=[text], images=pictures, return_tensors="np")
    ours = {k: np.asarray(out[k]) for k in ("input_ids", "attention_mask", "pixel_values")}
    types = (ours["input_ids"] == image_token_id).astype(np.int64)
    return ours, dict(ours, token_type_ids=types)


def test_gemma3_logits_match_transformers(gemma3_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(gemma3_dir, dtype="float32")
    ours_in, hf_in = chat_inputs(processor, images(((40, 30), (17, 23))),
                                 model.config.image_token_id)
    assert hf_in["token_type_ids"].sum() == 2 * model.config.mm_tokens_per_image
    ours = np.asarray(model(**ours_in))
    np.testing.assert_allclose(ours, hf_logits(gemma3_dir, hf_in, cls=CLS), atol=1e-4,
                               rtol=1e-4)
    # the bidirectional blocks matter: a causal-only forward differs inside the images
    causal = dataclasses.replace(model.arch, image_blocks=False)
    plain = np.asarray(forward(causal, model.config, None, model.frozen, None,
                               model.batch(ours_in)))
    assert np.abs(plain - ours).max() > 1e-3


def test_gemma3_peft_adapter_and_merged_export(gemma3_dir: pathlib.Path,
                                               tmp_path: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(gemma3_dir, dtype="float32")
    ours_in, hf_in = chat_inputs(processor, images(((32, 32),), seed=3),
                                 model.config.image_token_id)
    # 3 language layers x 7 projections, 2 tower layers x 6 projections
    check_peft_and_merged_exports(model, processor, gemma3_dir, tmp_path, ours_in, cls=CLS,
                                  modules=(21, 12), hf_inputs=hf_in)


def test_gemma3_greedy_generation_matches_transformers(gemma3_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(gemma3_dir, dtype="float32")
    ours_in, hf_in = chat_inputs(processor, images(((36, 28),), seed=2),
                                 model.config.image_token_id)
    eos = processor.tokenizer.eos_token_id
    ours = model.generate(ours_in, max_new_tokens=10, eos_token_id=eos)
    ref = run_reference(HF_GENERATE, hf_in, folder=str(gemma3_dir), cls=CLS, new=10,
                        eos=eos)["tokens"][0].tolist()
    if eos in ref:
        ref = ref[:ref.index(eos) + 1]
    assert ours.tokens[0] == ref
