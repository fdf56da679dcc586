"""Checkpoints saved by transformers + bitsandbytes (4-bit NF4 and 8-bit) load as stored."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.quant import QTensor, QuantKind, dequantize
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

MAKE = """
import torch, pathlib
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM, BitsAndBytesConfig
import bitsandbytes.functional as F
torch.manual_seed(0)
root = pathlib.Path(ARGS["root"])
cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
LlamaForCausalLM(cfg).save_pretrained(root / "float")
ids = torch.tensor(INPUTS["ids"])
q4 = AutoModelForCausalLM.from_pretrained(root / "float", device_map="cpu", dtype=torch.float32,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
q4.save_pretrained(root / "bnb4")
# bitsandbytes' CPU matmul is approximate (it differs from its own dequantize-then-matmul by ~1e-2),
# so the reference is transformers on the weights bitsandbytes itself dequantizes.
dense = LlamaForCausalLM.from_pretrained(root / "float", dtype=torch.float32).eval()
with torch.no_grad():
    for name, module in q4.named_modules():
        if module.__class__.__name__ == "Linear4bit":
            target = dense.get_submodule(name)
            target.weight.copy_(F.dequantize_4bit(module.weight.data, module.weight.quant_state))
    OUTPUTS["bnb4_logits"] = dense(input_ids=ids).logits.float().numpy()
q8 = AutoModelForCausalLM.from_pretrained(root / "float", device_map="cpu", dtype=torch.float32,
    quantization_config=BitsAndBytesConfig(load_in_8bit=True))
q8.save_pretrained(root / "bnb8")
w = q8.model.layers[1].mlp.up_proj.weight
OUTPUTS["bnb8_up1"] = F.int8_vectorwise_dequant(w.data, w.SCB).float().numpy()
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 12)).astype(np.int64)
    return root, ids, run_reference(MAKE, {"ids": ids}, root=str(root))


def test_prequantized_4bit_loads_as_stored_and_matches_bnb_dequantized_weights(saved):
    root, ids, ref = saved
    model, _ = FastLanguageModel.from_pretrained(root / "bnb4", dtype="float32")
    w = model.params()["layers"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(w, QTensor) and w.kind is QuantKind.NF4 and w.lead == (2,)
    logits = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(logits, ref["bnb4_logits"], atol=1e-4, rtol=0)


def test_prequantized_8bit_loads_as_stored(saved):
    root, _, ref = saved
    model, _ = FastLanguageModel.from_pretrained(root / "bnb8", dtype="float32")
    w = model.params()["layers"]["mlp"]["up_proj"]["weight"]
    assert isinstance(w, QTensor) and w.kind is QuantKind.INT8
    np.testing.assert_allclose(np.asarray(dequantize(w[1], jnp.float32)), ref["bnb8_up1"],
                               rtol=1e-6, atol=1e-7)


def test_merged_export_of_quantized_model_is_dense(saved, tmp_path):
    import json

    root, ids, _ = saved
    model, _ = FastLanguageModel.from_pretrained(root / "bnb4", dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=2, init_lora_weights=False)
    model.save_pretrained_merged(tmp_path / "m", dtype="float32")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged, _ = FastLanguageModel.from_pretrained(tmp_path / "m", dtype="float32")
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids, jnp.int32))),
                               np.asarray(model(jnp.asarray(ids, jnp.int32))), atol=1e-4)
