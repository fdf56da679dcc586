"""Gemma 3 270M (real weights, SentencePiece tokenizer) exported to f16 GGUF and run by llama.cpp:
the greedy continuation equals ours and llama.cpp's tokenizer gives the HF tokenizer's ids."""

from __future__ import annotations

import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from tests.llamacpp_ref import llama_cpp_jobs
from tests.parity.test_gemma3_real import gemma3_dir  # noqa: F401  (the fixture)
from tests.parity.test_gguf_llama_cpp import NEW, TOKENIZER_TEXTS, greedy

pytestmark = [pytest.mark.reference, pytest.mark.slow]


def test_gemma3_270m_f16_greedy_and_tokenizer_match(gemma3_dir, tmp_path):  # noqa: F811
    model, tokenizer = FastLanguageModel.from_pretrained(gemma3_dir, dtype="float32")
    path = model.save_pretrained_gguf(tmp_path / "gemma3", tokenizer, quantization_method="f16",
                                      show_progress=False)
    ids = tokenizer("The three primary colors are red, yellow and")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    expected = greedy(model, ids)
    theirs, tokens = llama_cpp_jobs([dict(kind="greedy", path=path, ids=ids, n=NEW),
                                     dict(kind="tokenize", path=path, texts=TOKENIZER_TEXTS)])
    assert theirs.tolist() == expected
    assert len(set(expected)) > 8
    wrong = {text: (got, tokenizer(text, add_special_tokens=False)["input_ids"])
             for text, got in zip(TOKENIZER_TEXTS, tokens)
             if got != tokenizer(text, add_special_tokens=False)["input_ids"]}
    assert not wrong
    assert np.all([len(t) > 0 for t in tokens])
