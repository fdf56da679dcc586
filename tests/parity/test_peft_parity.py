"""Adapters and merged checkpoints against their real consumers: peft and transformers (torch)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.models import decoder
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)

MAKE_BASE = """
import torch, pathlib
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**ARGS["config"])).eval()
model.save_pretrained(pathlib.Path(ARGS["out"]), safe_serialization=True)
"""

PEFT_LOGITS = """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
ids = torch.tensor(INPUTS["ids"])
for name, (base, adapter) in ARGS["pairs"].items():
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        OUTPUTS[name] = model(input_ids=ids).logits.float().numpy()
"""

MAKE_PEFT_ADAPTER = """
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
torch.manual_seed(1)
model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                 init_lora_weights=False, task_type="CAUSAL_LM", use_dora=ARGS["dora"])
model = get_peft_model(model, cfg).eval()
model.save_pretrained(ARGS["out"])
with torch.no_grad():
    OUTPUTS["logits"] = model(input_ids=torch.tensor(INPUTS["ids"])).logits.float().numpy()
"""

ADAPTERS = {
    "all_targets": dict(r=4, lora_alpha=8),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj",
                            "up_proj"], rank_pattern={"o_proj": 2, "layers.1.self_attn.q_proj": 6},
                            alpha_pattern={"up_proj": 3.0}),
    "regex_targets": dict(r=3, lora_alpha=5, target_modules=r".*layers\.[02]\.mlp\.(gate|down)_proj"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "gate_proj"]),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    run_reference(MAKE_BASE, config=BASE, out=str(out))
    return out


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(3).integers(0, BASE["vocab_size"], size=(2, 16)).astype(np.int64)


def ours(model, ids):
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="module")
def exported(base_dir, ids, tmp_path_factory):
    """Our adapters (random non-zero B) and merged exports, with our logits."""
    root = tmp_path_factory.mktemp("exports")
    results, pairs = {}, {}
    for name, kwargs in ADAPTERS.items():
        model, _ = FastLanguageModel.from_pretrained(base_dir, dtype="float32")
        model = FastLanguageModel.get_peft_model(model, init_lora_weights=False, **kwargs)
        model.save_pretrained(root / name)
        results[name] = ours(model, ids)
        pairs[name] = (str(base_dir), str(root / name))
        # one export is sharded into small files (with model.safetensors.index.json)
        model.save_pretrained_merged(root / f"{name}-merged", dtype="float32",
                                     max_shard_size="100KB" if name == "all_targets" else "5GB")
        pairs[f"{name}-merged"] = (str(root / f"{name}-merged"), None)
        results[f"{name}-merged"] = np.asarray(decoder.forward(
            model.config, model.merged_params(jnp.float32), jnp.asarray(ids, jnp.int32)))
    # NF4 base: compared against transformers on our dequantized weights.
    q, _ = FastLanguageModel.from_pretrained(base_dir, dtype="float32", load_in_4bit=True)
    q = FastLanguageModel.get_peft_model(q, r=4, lora_alpha=8, init_lora_weights=False)
    q.save_pretrained(root / "nf4")
    from fastlora_jax.converters.merged import save_merged

    save_merged(root / "nf4-dequantized-base", q.config, _dequantized(q), dtype="float32")
    results["nf4"] = ours(q, ids)
    pairs["nf4"] = (str(root / "nf4-dequantized-base"), str(root / "nf4"))
    ref = run_reference(PEFT_LOGITS, {"ids": ids}, pairs=pairs)
    return root, results, ref


def _dequantized(model):
    """The frozen weights with every QTensor dequantized to float32 (what NF4 compute sees)."""
    import jax

    from fastlora_jax.lora.layer import dense

    return jax.tree.map(lambda w: dense(w), model.params(), is_leaf=lambda x: hasattr(x, "codes"))


@pytest.mark.parametrize("name", sorted(ADAPTERS) + ["nf4"])
def test_our_adapter_loads_in_peft_with_same_logits(exported, name):
    _, results, ref = exported
    np.testing.assert_allclose(results[name], ref[name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_merged_export_loads_in_transformers_with_same_logits(exported, name):
    _, results, ref = exported
    np.testing.assert_allclose(results[f"{name}-merged"], ref[f"{name}-merged"], atol=1e-4, rtol=0)
    # folding the adapter in gives the same model as applying it
    np.testing.assert_allclose(results[f"{name}-merged"], results[name], atol=1e-4, rtol=0)


def test_merged_export_shards_with_an_index(exported):
    root, _, _ = exported
    folder = root / "all_targets-merged"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 3 and all((folder / f).exists() for f in shards)
    assert not (root / "dora-merged" / "model.safetensors.index.json").exists()


def test_adapter_config_is_what_peft_writes(exported):
    root, _, _ = exported
    cfg = json.loads((root / "rslora_patterns" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert cfg["rank_pattern"] == {"o_proj": 2, "layers.1.self_attn.q_proj": 6}
    assert cfg["target_modules"] == ["q_proj", "o_proj", "up_proj"]
    assert cfg["base_model_name_or_path"].endswith("tiny-llama")


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_made_by_peft_loads_into_our_model(base_dir, ids, tmp_path, dora):
    out = tmp_path / "peft-made"
    ref = run_reference(MAKE_PEFT_ADAPTER, {"ids": ids}, base=str(base_dir), out=str(out),
                        dora=dora)
    model, _ = FastLanguageModel.from_pretrained(base_dir, dtype="float32")
    model.load_adapter(out)
    np.testing.assert_allclose(ours(model, ids), ref["logits"], atol=1e-4, rtol=0)
    # and through from_pretrained(adapter_dir), which resolves the base from the adapter config
    again, _ = FastLanguageModel.from_pretrained(out, dtype="float32")
    np.testing.assert_allclose(ours(again, ids), ref["logits"], atol=1e-4, rtol=0)


def test_bf16_merged_export_is_the_rounded_merge(base_dir, ids, tmp_path):
    """The default 16-bit export holds bfloat16(W + s·B·A) exactly, and computes like it."""
    import jax

    model = FastLanguageModel.get_peft_model(
        FastLanguageModel.from_pretrained(base_dir, dtype="float32")[0], r=4,
        init_lora_weights=False)
    model.save_pretrained_merged(tmp_path / "m16")
    cfg = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    merged, _ = FastLanguageModel.from_pretrained(tmp_path / "m16", dtype="float32")
    rounded = jax.tree.map(lambda w: w.astype(jnp.bfloat16).astype(jnp.float32),
                           model.merged_params(jnp.float32))
    for got, want in zip(jax.tree.leaves(merged.params()), jax.tree.leaves(rounded)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(ours(merged, ids), np.asarray(decoder.forward(
        model.config, rounded, jnp.asarray(ids, jnp.int32))), atol=1e-5, rtol=0)


SMOL_PEFT = """
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
model = PeftModel.from_pretrained(model, ARGS["adapter"]).eval()
with torch.no_grad():
    OUTPUTS["logits"] = model(input_ids=torch.tensor(INPUTS["ids"])).logits.float().numpy()
"""


@pytest.mark.slow
def test_smollm2_adapter_with_random_b_matches_peft(smollm2_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False)
    model.save_pretrained(tmp_path / "adapter")
    ids = np.asarray([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    ref = run_reference(SMOL_PEFT, {"ids": ids}, base=str(smollm2_dir),
                        adapter=str(tmp_path / "adapter"))["logits"]
    got = ours(model, ids)
    base = ours(FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")[0], ids)
    assert np.abs(got - base).max() > 1.0  # the random adapter really changes the model
    # float32 summation order over 30 layers differs between XLA and torch by up to ~1e-5 of a
    # logit's size (logits reach ~30 here; a max |diff| of 1.17e-4 was measured on this CPU), so the
    # bound is 1e-4 plus 1e-5 relative, not a flat 1e-4
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)
