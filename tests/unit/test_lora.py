"""LoRA configuration, matching and bad input; adapter export/import errors (no torch needed)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import CheckpointError, ConfigError, ExportError, FastLanguageModel
from fastlora_jax.lora.spec import LoraConfig, resolve
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def base(tmp_path):
    return write_checkpoint(tmp_path / "base", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))


def model_of(path, **kw):
    return FastLanguageModel.from_pretrained(path, dtype="float32", **kw)[0]


def test_default_init_is_identity_and_b_zero(base):
    m = model_of(base)
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    before = np.asarray(m(ids))
    m = FastLanguageModel.get_peft_model(m)
    lora = m.lora_params()["layers"]
    assert set(lora["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(lora["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    a, b = lora["self_attn"]["q_proj"]["lora_A"], lora["self_attn"]["q_proj"]["lora_B"]
    assert a.shape == (2, 16, 32) and b.shape == (2, 32, 16) and a.dtype == jnp.float32
    assert float(jnp.abs(a).max()) > 0 and float(jnp.abs(b).max()) == 0
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(32)  # kaiming_uniform(a=sqrt(5)) bound
    np.testing.assert_array_equal(np.asarray(m(ids)), before)


def test_random_state_is_reproducible(base):
    a = FastLanguageModel.get_peft_model(model_of(base), random_state=7).lora_params()
    b = FastLanguageModel.get_peft_model(model_of(base), random_state=7).lora_params()
    c = FastLanguageModel.get_peft_model(model_of(base), random_state=8).lora_params()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(jax.tree.leaves(a)[0]), np.asarray(jax.tree.leaves(c)[0]))


def test_peft_matching_rules():
    from fastlora_jax.models.registry import config_from_hf

    cfg = config_from_hf(TINY_LLAMA)
    spec = resolve(LoraConfig.create(target_modules=["self_attn.q_proj", "down_proj"]), cfg, ALL)
    assert spec.targets == (("self_attn", "q_proj"), ("mlp", "down_proj"))
    spec = resolve(LoraConfig.create(target_modules=r"model\.layers\.1\.mlp\.up_proj"), cfg, ALL)
    assert spec.modules == ((("mlp", "up_proj"), (0, 16), (0.0, 1.0)),)
    spec = resolve(LoraConfig.create(r=8, lora_alpha=16, use_rslora=True,
                                     rank_pattern={"layers.0.self_attn.v_proj": 2}), cfg, ALL)
    ranks, scales = spec.entry(("self_attn", "v_proj"))
    assert ranks == (2, 8) and scales == pytest.approx((16 / np.sqrt(2), 16 / np.sqrt(8)))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(r=0), "r=0"), (dict(r=-2), "r=-2"), (dict(lora_alpha=0), "lora_alpha=0"),
    (dict(lora_alpha=-1.5), "lora_alpha=-1.5"), (dict(lora_dropout=1.0), "lora_dropout=1.0"),
    (dict(lora_dropout=-0.1), "lora_dropout=-0.1"), (dict(bias="all"), "bias='all'"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(use_gradient_checkpointing="unsloth"),
     "TrainingArguments(use_gradient_checkpointing='unsloth')"),
])
def test_bad_lora_arguments(base, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        FastLanguageModel.get_peft_model(model_of(base), **kwargs)


def test_target_matching_nothing_lists_available_names(base):
    with pytest.raises(ConfigError) as info:
        FastLanguageModel.get_peft_model(model_of(base), target_modules=["query_key_value"])
    for name in ALL:
        assert name in str(info.value)


def test_dora_on_unsupported_layer(base):
    with pytest.raises(ConfigError, match="DoRA on lm_head is not supported"):
        FastLanguageModel.get_peft_model(model_of(base), use_dora=True,
                                         target_modules=["q_proj", "lm_head"])


def test_adapter_round_trip_and_rank_padding(base, tmp_path):
    m = FastLanguageModel.get_peft_model(model_of(base), init_lora_weights=False, r=4,
                                         rank_pattern={"layers.1.mlp.up_proj": 2}, use_dora=True)
    ids = jnp.arange(10, dtype=jnp.int32)[None]
    m.save_pretrained(tmp_path / "ad")
    again = model_of(base)
    again.load_adapter(tmp_path / "ad")
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(m(ids)), atol=1e-6)
    up = again.lora_params()["layers"]["mlp"]["up_proj"]["lora_A"]
    assert up.shape == (2, 4, 32) and float(jnp.abs(up[1, 2:]).max()) == 0.0


def test_adapter_for_other_base_shapes_is_refused(base, tmp_path):
    m = FastLanguageModel.get_peft_model(model_of(base), init_lora_weights=False)
    m.save_pretrained(tmp_path / "ad")
    bigger = dict(TINY_LLAMA, hidden_size=48, num_attention_heads=4)
    other = write_checkpoint(tmp_path / "other", bigger, llama_tensors(bigger))
    with pytest.raises(CheckpointError, match="expected .* for this base model"):
        model_of(other).load_adapter(tmp_path / "ad")
    deeper = dict(TINY_LLAMA, num_hidden_layers=3)
    other = write_checkpoint(tmp_path / "deeper", deeper, llama_tensors(deeper))
    with pytest.raises(CheckpointError, match="layers.2"):
        model_of(other).load_adapter(tmp_path / "ad")


def test_corrupt_adapter_config(base, tmp_path):
    m = FastLanguageModel.get_peft_model(model_of(base))
    m.save_pretrained(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text('{"r": 8, ')
    with pytest.raises(CheckpointError, match="adapter_config.json.*not valid JSON"):
        model_of(base).load_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type must be 'LORA'"):
        model_of(base).load_adapter(tmp_path / "ad")


def test_export_refuses_non_empty_dir_and_writes_nothing_half(base, tmp_path):
    m = FastLanguageModel.get_peft_model(model_of(base))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        m.save_pretrained(target)
    with pytest.raises(ExportError, match="not empty"):
        m.save_pretrained_merged(target)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    m.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_export_to_unwritable_dir(base, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    m = FastLanguageModel.get_peft_model(model_of(base))
    with pytest.raises(ExportError, match="cannot write"):
        m.save_pretrained(locked / "ad")


def test_export_under_a_file_is_refused(base, tmp_path):
    (tmp_path / "file").write_text("x")
    m = FastLanguageModel.get_peft_model(model_of(base))
    with pytest.raises(ExportError, match="cannot write"):
        m.save_pretrained(tmp_path / "file" / "ad")


def test_save_without_adapter_is_an_error(base, tmp_path):
    with pytest.raises(ExportError, match="get_peft_model"):
        model_of(base).save_pretrained(tmp_path / "x")


def test_save_pretrained_merged_methods(base, tmp_path):
    m = FastLanguageModel.get_peft_model(model_of(base))
    with pytest.raises(ExportError, match="save_method='gguf' must be one of"):
        m.save_pretrained_merged(tmp_path / "bad", save_method="gguf")
    assert not (tmp_path / "bad").exists()
    m.save_pretrained_merged(tmp_path / "ad", save_method="lora")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]


def test_nf4_and_int8_loading_quantize_only_projections(base):
    from fastlora_jax.models import decoder
    from fastlora_jax.quant import QTensor, QuantKind, dequantize

    for kw, kind in ((dict(load_in_4bit=True), QuantKind.NF4), (dict(load_in_8bit=True),
                                                                QuantKind.INT8)):
        m = model_of(base, **kw)
        p = m.params()
        assert isinstance(p["layers"]["mlp"]["down_proj"]["weight"], QTensor)
        assert p["layers"]["mlp"]["down_proj"]["weight"].kind is kind
        assert not isinstance(p["embed_tokens"]["weight"], QTensor)
        assert not isinstance(p["lm_head"]["weight"], QTensor)
        ids = jnp.arange(8, dtype=jnp.int32)[None]
        dense = jax.tree.map(lambda w: dequantize(w, jnp.float32) if isinstance(w, QTensor)
                             else w, p, is_leaf=lambda w: isinstance(w, QTensor))
        expected = np.asarray(decoder.forward(m.config, dense, ids))
        np.testing.assert_allclose(np.asarray(m(ids)), expected, atol=1e-5)
        full = np.asarray(model_of(base)(ids))
        assert not np.allclose(expected, full, atol=1e-3)  # quantization really happened


def test_merged_export_of_a_quantized_model_without_adapters(base, tmp_path):
    """With nothing to fold in, the merged export is the dequantized model (it used to hand the
    QTensors to the writer and fail)."""
    from fastlora_jax.quant import QTensor, dequantize

    m = model_of(base, load_in_4bit=True)
    m.save_pretrained_merged(tmp_path / "merged", dtype="float32")
    back = model_of(tmp_path / "merged")
    w = m.params()["layers"]["mlp"]["down_proj"]["weight"]
    assert isinstance(w, QTensor)
    np.testing.assert_array_equal(np.asarray(back.params()["layers"]["mlp"]["down_proj"]["weight"]),
                                  np.asarray(dequantize(w, jnp.float32)))
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    np.testing.assert_allclose(np.asarray(back(ids)), np.asarray(m(ids)), atol=1e-5)
