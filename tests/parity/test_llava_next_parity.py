"""LLaVA-NeXT against transformers (torch, float32) on a tiny random checkpoint saved with its
processor (28-pixel CLIP tiles; 1 x 2, 2 x 1 and 2 x 2 tile grids): logits with images of
different aspect ratios in one prompt (different grids, rows or columns unpadded, tiles padded
to the batch's most), greedy generation, our PEFT adapter and merged export loaded by their
consumers on `LlavaNextForConditionalGeneration`; placeholders that disagree with the images'
features and an unknown config key are one clear error each."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from fastlora_jax import FastVisionModel
from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.testing.vision import (HF_GENERATE, build_llava_next,
                                         check_peft_and_merged_exports, hf_logits, images)
from fastlora_jax.vision.llava_next import parse_config

pytestmark = pytest.mark.reference
CLS = "LlavaNextForConditionalGeneration"


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_llava_next(tmp_path_factory.mktemp("llava_next") / "ckpt")


def chat_inputs(processor, pictures: list) -> dict[str, np.ndarray]:
    content = [{"type": "image"}] * len(pictures) + [{"type": "text", "text": "Colours?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    out = processor(text=[text], images=pictures, return_tensors="np")
    return {k: np.asarray(out[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                           "image_sizes")}


def test_llava_next_logits_match_transformers(next_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(next_dir, dtype="float32")
    # (width, height): a 2 x 2 grid with columns cut, a 1 x 2 grid with rows cut, a 2 x 1 grid
    inputs = chat_inputs(processor, images(((40, 30), (64, 20), (17, 23)), seed=3))
    assert inputs["pixel_values"].shape[:2] == (3, 5)  # tiles padded to the most (4 + base)
    # per image: base 16 + the unpadded map's rows x (columns + newline): 8 x 6, 2 x 8, 8 x 2
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 70 + 34 + 28
    np.testing.assert_allclose(np.asarray(model(**inputs)), hf_logits(next_dir, inputs, CLS),
                               atol=1e-4, rtol=1e-4)
    # placeholders that disagree with the images' features
    first = int(np.argmax(inputs["input_ids"][0] == model.config.image_token_id))
    fewer = {k: v for k, v in inputs.items()}
    fewer["input_ids"] = np.delete(inputs["input_ids"], first, axis=1)
    fewer["attention_mask"] = np.delete(inputs["attention_mask"], first, axis=1)
    with pytest.raises(DataError, match=r"hold 131 image placeholder token\(s\) but the images "
                                        r"give 132 feature rows"):
        model(**fewer)
    with pytest.raises(DataError, match="without image_sizes"):
        model(**{k: v for k, v in inputs.items() if k != "image_sizes"})
    raw = json.loads((next_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="key 'image_crop_mode'"):
        parse_config(dict(raw, image_crop_mode="spatial"), "config.json")
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        parse_config(dict(raw, image_grid_pinpoints=[[28, 50]]), "config.json")


def test_llava_next_greedy_generation_matches_transformers(next_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(next_dir, dtype="float32")
    inputs = chat_inputs(processor, images(((30, 70),), seed=2))  # tall: 2 x 1, columns cut
    eos = processor.tokenizer.eos_token_id
    ours = model.generate(inputs, max_new_tokens=10, eos_token_id=eos)
    ref = run_reference(HF_GENERATE, inputs, folder=str(next_dir), new=10, eos=eos,
                        cls=CLS)["tokens"][0].tolist()
    assert ours.tokens[0] == (ref[:ref.index(eos) + 1] if eos in ref else ref)


def test_llava_next_peft_adapter_and_merged_export(next_dir: pathlib.Path,
                                                   tmp_path: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(next_dir, dtype="float32")
    inputs = chat_inputs(processor, images(((50, 20), (32, 32)), seed=1))
    # 2 language layers x 7 projections, 3 tower layers x 6 projections
    check_peft_and_merged_exports(model, processor, next_dir, tmp_path, inputs, cls=CLS,
                                  modules=(14, 18))
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["image_grid_pinpoints"] == [[28, 56], [56, 28], [56, 56]]
