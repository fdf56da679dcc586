"""FastVisionModel on a tiny Qwen2.5-VL written by our exporter: load_in_4bit quantizes the text
model's projections only, Unsloth's switches pick the tower's attention (qkv, proj) and MLP
projections by their HF names, a saved adapter loads back with the same logits, and inputs whose
placeholders and images disagree are one clear error."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastVisionModel
from fastlora_jax.errors import DataError
from fastlora_jax.quant import QTensor, dequantize
from fastlora_jax.testing.vision import images, randomize_b, tiny_vlm_numpy


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_vlm_numpy(tmp_path_factory.mktemp("qwen_vl") / "ckpt", "qwen2_5_vl")


def inputs(processor) -> dict[str, np.ndarray]:
    content = [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    out = processor(text=[text], images=images(((40, 24),)), return_tensors="np")
    return {k: np.asarray(out[k]) for k in ("input_ids", "pixel_values", "image_grid_thw")}


def test_nf4_quantizes_the_language_model_only(qwen_dir: pathlib.Path) -> None:
    dense, processor = FastVisionModel.from_pretrained(qwen_dir, dtype="float32")
    model, _ = FastVisionModel.from_pretrained(qwen_dir, dtype="float32", load_in_4bit=True)
    assert isinstance(model.frozen["language"]["layers"]["mlp"]["up_proj"]["weight"], QTensor)
    tower = model.frozen["vision"]["tower"]["layers"]
    assert not any(isinstance(w, QTensor) for w in (
        tower["attn"]["qkv"]["weight"], tower["mlp"]["up_proj"]["weight"],
        model.frozen["vision"]["projector"]["mlp"]["0"]["weight"]))
    batch = inputs(processor)
    quantized = np.asarray(model(**batch))
    dense.frozen = jax.tree.map(lambda a: dequantize(a, jnp.float32) if isinstance(a, QTensor)
                                else a, model.frozen, is_leaf=lambda a: isinstance(a, QTensor))
    np.testing.assert_allclose(quantized, np.asarray(dense(**batch)), atol=2e-4, rtol=2e-4)


def test_switches_and_adapter_round_trip(qwen_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(qwen_dir, dtype="float32")
    FastVisionModel.get_peft_model(model, finetune_language_layers=False,
                                   finetune_mlp_modules=False, r=4)
    assert model.lora_spec.language is None
    assert {m for m, _, _ in model.lora_spec.vision.modules} == {("attn", "qkv"),
                                                                  ("attn", "proj")}
    FastVisionModel.get_peft_model(model, r=4)
    assert len(model.lora_spec.vision.modules) == 5 and len(model.lora_spec.language.modules) == 7
    randomize_b(model)
    batch = inputs(processor)
    ours = np.asarray(model(**batch))
    model.save_pretrained(tmp_path / "adapter")
    again, _ = FastVisionModel.from_pretrained(tmp_path / "adapter", dtype="float32")
    np.testing.assert_allclose(np.asarray(again(**batch)), ours, atol=1e-5, rtol=0)


def test_placeholders_and_images_must_agree(qwen_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(qwen_dir, dtype="float32")
    batch = inputs(processor)
    ids = batch["input_ids"]
    image = model.config.image_token_id
    extra = dict(batch, input_ids=np.where(np.roll(ids == image, -1), image, ids))  # one more
    with pytest.raises(DataError, match="image tokens"):
        model(**extra)
    with pytest.raises(DataError, match="2 images"):
        model(**dict(batch, image_grid_thw=np.concatenate([batch["image_grid_thw"]] * 2)))
