"""FastVisionModel on a tiny LLaVA written by our exporter: load_in_4bit / load_in_8bit quantize
the text model's projections only (tower and projector stay in the compute dtype, as Unsloth
keeps them), Unsloth's four switches pick the adapted modules, and inputs whose placeholders
and images disagree are one clear error."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastVisionModel
from fastlora_jax.errors import CheckpointError, ConfigError, DataError
from fastlora_jax.quant import QTensor, dequantize
from fastlora_jax.testing.vision import images, randomize_b, tiny_vlm_numpy


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_vlm_numpy(tmp_path_factory.mktemp("vlm_model") / "ckpt")


def inputs(processor, n_images: int = 1) -> dict[str, np.ndarray]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "Colour?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    out = processor(text=[text], images=images(((30, 20), (20, 30))[:n_images]),
                    return_tensors="np")
    return {k: np.asarray(out[k]) for k in ("input_ids", "pixel_values")}


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantized_language_model_only(llava_dir: pathlib.Path, flag: str) -> None:
    dense, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    model, _ = FastVisionModel.from_pretrained(llava_dir, dtype="float32", **{flag: True})
    layers = model.frozen["language"]["layers"]
    assert isinstance(layers["self_attn"]["q_proj"]["weight"], QTensor)
    assert isinstance(layers["mlp"]["down_proj"]["weight"], QTensor)
    tower = model.frozen["vision"]["tower"]["layers"]
    assert not any(isinstance(leaf, QTensor) for leaf in
                   [tower["self_attn"]["q_proj"]["weight"], tower["mlp"]["fc1"]["weight"],
                    model.frozen["vision"]["projector"]["linear_1"]["weight"]])
    assert tower["mlp"]["fc1"]["weight"].dtype == np.float32
    batch = inputs(processor)
    quantized = np.asarray(model(**batch))
    # the quantized model is the dense one on the weights its codes decode to
    dense.frozen = jax.tree.map(lambda a: dequantize(a, jnp.float32) if isinstance(a, QTensor)
                                else a, model.frozen, is_leaf=lambda a: isinstance(a, QTensor))
    np.testing.assert_allclose(quantized, np.asarray(dense(**batch)), atol=2e-4, rtol=2e-4)
    FastVisionModel.get_peft_model(model, r=4)  # adapters on a quantized base
    assert np.isfinite(np.asarray(model(**batch))).all()


def test_switches_pick_the_modules(llava_dir: pathlib.Path) -> None:
    model, _ = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    FastVisionModel.get_peft_model(model, finetune_vision_layers=False,
                                   finetune_mlp_modules=False, r=4)
    spec = model.lora_spec
    assert spec.vision is None and "vision" not in model.lora
    assert {name for _, name in spec.language.targets} == {"q_proj", "k_proj", "v_proj",
                                                           "o_proj"}
    assert re.fullmatch(spec.config.target_modules, "model.language_model.layers.1.self_attn.o_proj")
    assert not re.fullmatch(spec.config.target_modules, "model.language_model.layers.1.mlp.up_proj")
    FastVisionModel.get_peft_model(model, finetune_language_layers=False,
                                   finetune_attention_modules=False, r=4)
    assert model.lora_spec.language is None
    assert {name for _, name in model.lora_spec.vision.targets} == {"fc1", "fc2"}
    with pytest.raises(ConfigError, match="both False"):
        FastVisionModel.get_peft_model(model, finetune_vision_layers=False,
                                       finetune_language_layers=False)


def test_placeholders_and_images_must_agree(llava_dir: pathlib.Path) -> None:
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    two = inputs(processor, n_images=2)
    with pytest.raises(DataError, match=r"hold 32 image placeholder token\(s\) but the images "
                                        r"give 16 feature rows"):
        model(input_ids=two["input_ids"], pixel_values=two["pixel_values"][:1])
    with pytest.raises(DataError, match="no pixel_values"):
        model(input_ids=two["input_ids"])


def test_packing_is_refused(llava_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """An image's tokens must stay in one row: a vision model trains on padded rows only."""
    from fastlora_jax import SFTTrainer, TrainingArguments
    from fastlora_jax.testing.vision import shapes_dataset

    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    FastVisionModel.get_peft_model(model, r=4)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), packing=True)
    with pytest.raises(ConfigError, match=r"padded rows \(an image's tokens must stay in one "
                                          r"row\); set packing=False"):
        SFTTrainer(model=model, tokenizer=processor, args=args,
                   train_dataset=str(shapes_dataset(tmp_path / "data", n=2)))


def test_unsupported_checkpoint_lists_architectures(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "mllama"}')
    with pytest.raises(ConfigError, match=r"'mllama' is not a supported vision-language "
                                          r"architecture; supported model_types: \[.*'gemma3'.*'llava', 'llava_next'"):
        FastVisionModel.from_pretrained(tmp_path)


def test_adapter_round_trip(llava_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """save_pretrained, then from_pretrained on the adapter folder (base, then adapter)."""
    model, processor = FastVisionModel.from_pretrained(llava_dir, dtype="float32")
    FastVisionModel.get_peft_model(model, r=4, finetune_mlp_modules=False)
    randomize_b(model)
    batch = inputs(processor)
    model.save_pretrained(tmp_path / "adapter")
    loaded, _ = FastVisionModel.from_pretrained(tmp_path / "adapter", dtype="float32")
    assert loaded.lora_spec.language.targets == model.lora_spec.language.targets
    np.testing.assert_allclose(np.asarray(loaded(**batch)), np.asarray(model(**batch)),
                               atol=1e-6)
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text().replace(
            "self_attn", "cross_attn"))
    with pytest.raises(CheckpointError, match="matches no module"):
        loaded.load_adapter(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), target_modules=None)))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: target_modules is null; "
                                              r"a vision-language adapter must name"):
        loaded.load_adapter(tmp_path / "adapter")
