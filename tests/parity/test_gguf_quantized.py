"""Quantized GGUF exports against llama.cpp's own quantizer (`llama_model_quantize` on our f16
file) and against our float32 logits, read by llama.cpp.

- Tiny llama with 256-aligned rows (every tensor takes its K-quant, no fallbacks): for q4_k_m,
  q5_k_m, q6_k, q8_0 and q4_0 our file has llama.cpp's tensor types tensor for tensor and, per
  tensor, the same bytes in >= 97% of the blocks (bit-exact for the legacy types).
- SmolLM2-135M-Instruct on a shipped text (Python's LICENSE): q8_0 top-1 agreement with our
  float32 logits >= 98% over 511 positions; q4_k_m and q6_k perplexity within 1% of llama.cpp's
  quantization of our f16 file; an NF4 base with a LoRA merged and exported as q8_0 agrees with
  our NF4 + LoRA logits the same way.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from tests.llamacpp_ref import llama_cpp_jobs
from tests.parity.test_gguf_llama_cpp import tiny_model

pytestmark = pytest.mark.reference

ALIGNED = dict(model_type="llama", vocab_size=49152, hidden_size=256, intermediate_size=512,
               num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
               hidden_act="silu", tie_word_embeddings=False)
METHODS = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0")


def _tensors(path: pathlib.Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def _text_ids(tokenizer, n: int) -> list[int]:
    text = (pathlib.Path(os.__file__).parent / "LICENSE.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def test_our_quantized_files_equal_llama_cpp_quantizing_our_f16(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = tiny_model(ALIGNED, seed=11)  # float16-exact weights: both sides see one input
    f16 = model.save_pretrained_gguf(tmp_path / "f16", tokenizer, quantization_method="f16",
                                     show_progress=False)
    jobs = []
    for m in METHODS:
        model.save_pretrained_gguf(tmp_path / m, tokenizer, quantization_method=m,
                                   show_progress=False)
        jobs.append(dict(kind="quantize", path=f16, out=tmp_path / f"llama_cpp_{m}.gguf",
                         ftype=int(gguf_quants_method(m).file_type)))
    assert all(int(rc) == 0 for rc in llama_cpp_jobs(jobs))
    for m in METHODS:
        ours = _tensors(tmp_path / m / f"model.{m.upper()}.gguf")
        theirs = _tensors(tmp_path / f"llama_cpp_{m}.gguf")
        assert sorted(ours) == sorted(theirs)
        kinds = set()
        for name, (qtype, data) in theirs.items():
            assert ours[name][0] == qtype, (m, name, ours[name][0], qtype)
            kinds.add(qtype)
            if qtype in ("F32", "F16"):
                assert np.array_equal(ours[name][1], data), (m, name)
                continue
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
            same = np.mean((ours[name][1].reshape(-1, block) == data.reshape(-1, block)).all(1))
            assert same >= (0.97 if qtype.endswith("_K") else 1.0), (m, name, qtype, same)
        if m == "q4_k_m":
            assert kinds >= {"Q4_K", "Q6_K", "F32"}


def gguf_quants_method(name: str):
    from fastlora_jax.converters.gguf_quants import method

    return method(name)


@pytest.mark.slow
def test_smollm2_quantized_exports_against_llama_cpp(smollm2_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    ids = _text_ids(tokenizer, 1024)
    ours_logits = np.asarray(model(jnp.asarray([ids[:512]])))[0]
    files = {m: model.save_pretrained_gguf(tmp_path / m, tokenizer, quantization_method=m,
                                           show_progress=False)
             for m in ("f16", "q8_0", "q4_k_m", "q6_k")}
    jobs = [dict(kind="quantize", path=files["f16"], out=tmp_path / f"llama_cpp_{m}.gguf",
                 ftype=int(gguf_quants_method(m).file_type)) for m in ("q4_k_m", "q6_k")]
    jobs.append(dict(kind="logits", path=files["q8_0"], ids=ids[:512]))
    for m in ("q4_k_m", "q6_k"):
        jobs.append(dict(kind="nll", path=files[m], ids=ids, n_ctx=512))
        jobs.append(dict(kind="nll", path=tmp_path / f"llama_cpp_{m}.gguf", ids=ids, n_ctx=512))
    rc1, rc2, q8_logits, *nll = llama_cpp_jobs(jobs)
    assert int(rc1) == 0 and int(rc2) == 0
    agree = np.mean(q8_logits[:-1].argmax(-1) == ours_logits[:-1].argmax(-1))
    assert agree >= 0.98, agree
    for i, m in enumerate(("q4_k_m", "q6_k")):
        ppl_ours, ppl_theirs = np.exp(nll[2 * i].mean()), np.exp(nll[2 * i + 1].mean())
        assert abs(ppl_ours / ppl_theirs - 1) < 0.01, (m, ppl_ours, ppl_theirs)
        print(f"{m}: perplexity ours {ppl_ours:.4f}, llama.cpp {ppl_theirs:.4f}; q8_0 top-1 "
              f"agreement {agree:.4f}")


@pytest.mark.slow
def test_nf4_base_with_lora_exports_merged(smollm2_dir, tmp_path):
    """An NF4 (QLoRA) model: the base is dequantized, the adapter merged in float32 and the sum
    requantized; llama.cpp's q8_0 logits agree with our NF4 + LoRA logits."""
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32",
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False,
                                             random_state=2)
    ids = _text_ids(tokenizer, 512)
    ours = np.asarray(model(jnp.asarray([ids])))[0]
    path = model.save_pretrained_gguf(tmp_path / "nf4", tokenizer, quantization_method="q8_0",
                                      show_progress=False)
    (theirs,) = llama_cpp_jobs([dict(kind="logits", path=path, ids=ids)])
    agree = np.mean(theirs[:-1].argmax(-1) == ours[:-1].argmax(-1))
    assert agree >= 0.98, agree
