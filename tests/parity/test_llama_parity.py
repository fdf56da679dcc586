"""Llama logits against transformers (torch, float32) on tiny random models and SmolLM2-135M."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.2)
CASES = {
    "mha_untied": dict(BASE, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(BASE, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(BASE, num_key_value_heads=1, tie_word_embeddings=False),
    "llama3_rope": dict(BASE, num_key_value_heads=2, max_position_embeddings=64,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=16),
                        rope_theta=500000.0),
    "linear_rope": dict(BASE, num_key_value_heads=2, rope_scaling=dict(rope_type="linear",
                                                                       factor=4.0)),
    "dynamic_rope_beyond_context": dict(BASE, num_key_value_heads=2, max_position_embeddings=16,
                                        rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "odd_sizes": dict(BASE, vocab_size=101, hidden_size=36, intermediate_size=50,
                      num_attention_heads=3, num_key_value_heads=3),
    "explicit_head_dim": dict(BASE, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16),
    "attention_bias": dict(BASE, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}
SEQ = 24

BUILD = """
import torch, pathlib
from transformers import LlamaConfig, LlamaForCausalLM
for name, cfg in ARGS["cases"].items():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))   # non-trivial norms and biases
    folder = pathlib.Path(ARGS["root"]) / name
    model.save_pretrained(folder, safe_serialization=True)
    ids = torch.tensor(INPUTS["ids"]) % cfg["vocab_size"]
    with torch.no_grad():
        OUTPUTS[name] = model(input_ids=ids).logits.float().numpy()
"""


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_llama")
    ids = np.random.default_rng(1).integers(0, 10_000, size=(2, SEQ)).astype(np.int64)
    logits = run_reference(BUILD, {"ids": ids}, cases=CASES, root=str(root))
    return root, ids, logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_llama_logits_match_transformers(hf_models, case):
    root, ids, logits = hf_models
    model, tokenizer = FastLanguageModel.from_pretrained(root / case, dtype="float32")
    assert tokenizer is None  # these folders have no tokenizer files
    ours = np.asarray(model(jnp.asarray(ids % CASES[case]["vocab_size"], jnp.int32)))
    assert ours.shape == logits[case].shape
    np.testing.assert_allclose(ours, logits[case], atol=1e-4, rtol=0)
    assert np.abs(logits[case]).max() > 0.5  # the comparison is not between near-zero numbers


def test_legacy_config_dialect_gives_same_logits(hf_models, tmp_path):
    """A v4-style config.json (rope_theta + rope_scaling with "type") loads to the same model."""
    root, ids, logits = hf_models
    src = root / "llama3_rope"
    cfg = json.loads((src / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    model, _ = FastLanguageModel.from_pretrained(tmp_path, dtype="float32")
    ours = np.asarray(model(jnp.asarray(ids % cfg["vocab_size"], jnp.int32)))
    np.testing.assert_allclose(ours, logits["llama3_rope"], atol=1e-4, rtol=0)


SMOL_REF = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(ARGS["path"], dtype=torch.float32).eval()
ids = torch.tensor(INPUTS["ids"])
with torch.no_grad():
    OUTPUTS["logits"] = model(input_ids=ids).logits.float().numpy()
    seq = ids
    for _ in range(ARGS["new_tokens"]):          # plain greedy, no EOS stop
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    OUTPUTS["continuation"] = seq[0, ids.shape[1]:].numpy()
"""


@pytest.mark.slow
def test_smollm2_real_weights_match_transformers(smollm2_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tokenizer(prompt, add_special_tokens=False)["input_ids"]], np.int64)
    ref = run_reference(SMOL_REF, {"ids": ids}, path=str(smollm2_dir), new_tokens=20)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - ref["logits"]).max() <= 1e-3
    continuation = model.generate(ids[0].tolist(), max_new_tokens=20,
                                  eos_token_id=[]).tokens[0]
    assert continuation == ref["continuation"].tolist()
    assert len(set(continuation)) > 3  # a real answer, not a repeated token
