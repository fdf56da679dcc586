"""Quantized GGUF exports against llama.cpp's own quantizer (`llama_model_quantize` on our f16
file) and against our float32 logits, read by llama.cpp.

- Tiny llama with 256-aligned rows (every tensor takes its K-quant, no fallbacks): for q4_k_m,
  q5_k_m, q6_k, q8_0 and q4_0 our file has llama.cpp's tensor types tensor for tensor and, per
  tensor, the same bytes in >= 97% of the blocks (bit-exact for the legacy types).
- SmolLM2-135M-Instruct on a shipped text (the Python reference's topics in pydoc_data):
  q4_k_m and q6_k perplexity within 1% of llama.cpp's quantization of our f16 file; q8_0: our
  q8_0 weights reproduce >= 98% of our float32 top-1 tokens over 511 positions, and llama.cpp
  running our q8_0 file is as close to our float32 logits as llama.cpp running its own q8_0
  quantization (KL within 10%; top-1 agreement >= 96%: llama.cpp's q8_0 matmul also rounds the
  activations to 8 bits, which costs its own quantization the same 2-3% of top-1 tokens here).
- An NF4 base with a LoRA merged and exported as q8_0 agrees with our NF4 + LoRA logits.
"""

from __future__ import annotations

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
    """The first n tokens of the Python reference's topics (shipped with the stdlib)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)),
                    add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over positions."""
    p, q = _log_softmax(p_logits), _log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(p) * (p - q), -1)))


def _dequantized_params(model, path: pathlib.Path):
    """Our parameter tree with the weights stored in the GGUF at `path` (read by the gguf
    package, moved back to our layout)."""
    import jax

    from fastlora_jax.converters import gguf_names
    from gguf.quants import dequantize

    from fastlora_jax.lora.layer import dense
    from fastlora_jax.quant import QTensor

    params = jax.tree.map(dense, model.params(), is_leaf=lambda x: isinstance(x, QTensor))
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("rope_"):
            continue
        pth, layer = gguf_names.param_from_gguf_name(model.config, t.name)
        value = dequantize(np.array(t.data), t.tensor_type).reshape(tuple(t.shape[::-1]))
        value = jnp.asarray(gguf_names.from_gguf_layout(model.config, pth, value.astype(
            np.float32)))
        node = params
        for key in pth[:-1]:
            node = node[key]
        node[pth[-1]] = value if layer is None else node[pth[-1]].at[layer].set(value)
    return params


@pytest.mark.slow
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
    from fastlora_jax.models import decoder

    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    ids = _text_ids(tokenizer, 1024)
    ours_logits = np.asarray(model(jnp.asarray([ids[:512]])))[0]
    files = {m: model.save_pretrained_gguf(tmp_path / m, tokenizer, quantization_method=m,
                                           show_progress=False)
             for m in ("f16", "q8_0", "q4_k_m", "q6_k")}
    theirs = {m: tmp_path / f"llama_cpp_{m}.gguf" for m in ("q8_0", "q4_k_m", "q6_k")}
    jobs = [dict(kind="quantize", path=files["f16"], out=theirs[m],
                 ftype=int(gguf_quants_method(m).file_type)) for m in theirs]
    jobs += [dict(kind="logits", path=files["q8_0"], ids=ids[:512]),
             dict(kind="logits", path=theirs["q8_0"], ids=ids[:512])]
    for m in ("q4_k_m", "q6_k"):
        jobs += [dict(kind="nll", path=files[m], ids=ids, n_ctx=512),
                 dict(kind="nll", path=theirs[m], ids=ids, n_ctx=512)]
    *codes, q8_ours, q8_theirs, nll_q4_ours, nll_q4_theirs, nll_q6_ours, nll_q6_theirs = (
        llama_cpp_jobs(jobs))
    assert all(int(rc) == 0 for rc in codes)
    top1 = ours_logits[:-1].argmax(-1)
    q8_weights = np.asarray(decoder.forward(model.config, _dequantized_params(model, files[
        "q8_0"]), jnp.asarray([ids[:512]])))[0]
    agree_weights = np.mean(q8_weights[:-1].argmax(-1) == top1)
    agree = np.mean(q8_ours[:-1].argmax(-1) == top1)
    kl_ours, kl_theirs = _kl(ours_logits, q8_ours), _kl(ours_logits, q8_theirs)
    print(f"q8_0: top-1 agreement {agree:.4f} in llama.cpp (its own q8_0: "
          f"{np.mean(q8_theirs[:-1].argmax(-1) == top1):.4f}), {agree_weights:.4f} with our "
          f"arithmetic; KL ours {kl_ours:.5f}, llama.cpp's {kl_theirs:.5f}")
    assert agree_weights >= 0.98
    assert agree >= 0.96
    assert kl_ours <= 1.1 * kl_theirs
    for m, nll_ours, nll_theirs in (("q4_k_m", nll_q4_ours, nll_q4_theirs),
                                    ("q6_k", nll_q6_ours, nll_q6_theirs)):
        ppl_ours, ppl_theirs = np.exp(nll_ours.mean()), np.exp(nll_theirs.mean())
        print(f"{m}: perplexity ours {ppl_ours:.4f}, llama.cpp's {ppl_theirs:.4f}")
        assert abs(ppl_ours / ppl_theirs - 1) < 0.01, (m, ppl_ours, ppl_theirs)


@pytest.mark.slow
def test_nf4_base_with_lora_exports_merged(smollm2_dir, tmp_path):
    """An NF4 (QLoRA) model: the base is dequantized, the adapter merged in float32 and the sum
    requantized as q8_0; llama.cpp's logits and ours on the stored weights agree with our
    NF4 + LoRA logits. The adapter is random with a trained adapter's size (B scaled to 0.1)."""
    import jax

    from fastlora_jax.models import decoder

    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32",
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False,
                                             random_state=2)
    model.set_adapter(model.lora_spec, jax.tree_util.tree_map_with_path(
        lambda key, v: v * 0.1 if "lora_B" in jax.tree_util.keystr(key) else v,
        model.lora_params()))
    ids = _text_ids(tokenizer, 512)
    ours = np.asarray(model(jnp.asarray([ids])))[0]
    path = model.save_pretrained_gguf(tmp_path / "nf4", tokenizer, quantization_method="q8_0",
                                      show_progress=False)
    (theirs,) = llama_cpp_jobs([dict(kind="logits", path=path, ids=ids)])
    stored = np.asarray(decoder.forward(model.config, _dequantized_params(model, path),
                                        jnp.asarray([ids])))[0]
    agree = np.mean(theirs[:-1].argmax(-1) == ours[:-1].argmax(-1))
    agree_stored = np.mean(stored[:-1].argmax(-1) == ours[:-1].argmax(-1))
    print(f"NF4 + LoRA -> q8_0: top-1 agreement {agree:.4f} in llama.cpp, {agree_stored:.4f} "
          f"with our arithmetic; KL {_kl(ours, theirs):.5f}")
    assert agree_stored >= 0.97
    assert agree >= 0.95
