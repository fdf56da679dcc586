"""GGUF export without llama.cpp: what the file holds (read back with the gguf package), the
Modelfile, and bad input (one clear error, nothing written)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import gguf
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.converters import gguf_names, ollama
from fastlora_jax.errors import ExportError, FastLoRAError
from fastlora_jax.models.decoder import get_path, param_specs
from tests.parity.test_gguf_llama_cpp import FAMILIES, tiny_model


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("family", ["llama3_rope_bias", "gemma3_local_rope", "phi3_longrope_partial"])
def test_f32_export_reads_back_to_our_parameters(family, tokenizer, tmp_path):
    model = tiny_model(FAMILIES[family], seed=3)
    path = model.save_pretrained_gguf(tmp_path / "out", tokenizer, quantization_method="f32",
                                      show_progress=False)
    assert path == tmp_path / "out" / "model.F32.gguf"
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    arch = meta["general.architecture"]
    assert meta["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    for key, value in gguf_names.to_gguf_metadata(model.config).items():
        assert meta[key] == pytest.approx(value), key
    tensors = {t.name: np.array(t.data).reshape(tuple(t.shape[::-1])) for t in reader.tensors}
    params = model.params()
    seen = set()
    for spec in param_specs(model.config):
        for layer in (range(model.config.num_layers) if spec.stacked else [None]):
            name = gguf_names.gguf_tensor_name(model.config, spec.path, layer)
            value = np.asarray(get_path(params, spec.path))
            value = value if layer is None else value[layer]
            back = gguf_names.from_gguf_layout(model.config, spec.path, tensors[name])
            assert np.allclose(back, value, atol=1e-6, rtol=0), name
            seen.add(name)
    assert set(tensors) - seen == set(gguf_names.rope_tensors(model.config)), arch
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.F32.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_lora_adapter_gguf_holds_scaled_factors(tokenizer, tmp_path):
    model = tiny_model(FAMILIES["llama3_rope_bias"], seed=4)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_rslora=True,
                                             target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False)
    path = model.save_pretrained_gguf(tmp_path / "lora", save_method="lora",
                                      show_progress=False)
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0
    tensors = {t.name: np.array(t.data).reshape(tuple(t.shape[::-1])) for t in reader.tensors}
    assert sorted(tensors) == sorted(f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2)
                                     for p in "qv" for ab in "ab")
    lora = model.lora_params()["layers"]["self_attn"]
    a, b = np.asarray(lora["q_proj"]["lora_A"][1]), np.asarray(lora["q_proj"]["lora_B"][1])
    # llama.cpp scales B A by alpha / r; rsLoRA's alpha / sqrt(r) is folded into B
    fold = (8 / np.sqrt(4)) * 4 / 8
    path_q = ("layers", "self_attn", "q_proj", "weight")
    assert np.allclose(tensors["blk.1.attn_q.weight.lora_a"], a)
    assert np.allclose(tensors["blk.1.attn_q.weight.lora_b"],
                       gguf_names.to_gguf_layout(model.config, path_q, b * fold), atol=1e-6)


def test_bad_input_raises_one_clear_error_and_writes_nothing(tokenizer, tmp_path):
    model = tiny_model(FAMILIES["qwen2_bias"], seed=5)
    target = tmp_path / "out"
    cases = [
        (dict(quantization_method="q3_k_xl"), "quantization_method='q3_k_xl' is not supported"),
        (dict(save_method="lora"), "no adapter to export"),
        (dict(save_method="gguf"), "save_method='gguf' must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            model.save_pretrained_gguf(target, tokenizer, show_progress=False, **kwargs)
        assert not target.exists()
    with pytest.raises(ExportError, match="carries its tokenizer"):
        model.save_pretrained_gguf(target, None, show_progress=False)
    untied = tiny_model(dict(FAMILIES["gemma2_window_caps"], tie_word_embeddings=False), seed=6)
    with pytest.raises(ExportError, match="tie_word_embeddings"):
        untied.save_pretrained_gguf(target, tokenizer, show_progress=False)
    assert not target.exists() and list(tmp_path.iterdir()) == []


class _BrokenTokenizer:
    """A tokenizer that fails once the GGUF is written (the Modelfile's stop tokens)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "all_special_tokens":
            raise RuntimeError("disk full")
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)


def test_a_failure_mid_export_leaves_nothing(tokenizer, tmp_path):
    model = tiny_model(FAMILIES["mistral_tied"], seed=7)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained_gguf(tmp_path / "out", _BrokenTokenizer(tokenizer),
                                   show_progress=False)
    assert list(tmp_path.iterdir()) == []


GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] "
    "+ '\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}<start_of_turn>{{ role }}\n{% if loop.first %}{{ first }}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Line one\nline two"},
     {"role": "assistant", "content": "Ok {{ not a template }}"},
     {"role": "user", "content": "Thanks"}],
]
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	var messages []Message
	raw, _ := os.ReadFile(os.Args[2])
	json.Unmarshal(raw, &messages)
	t := template.Must(template.New("m").Parse(string(src)))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
		panic(err)
	}
}
"""


def _go_render(tmp_path: pathlib.Path, template: str, messages: list[dict]) -> str:
    """Ollama's renderer: Go's text/template over .Messages."""
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(template)
    (tmp_path / "messages.json").write_text(json.dumps(
        [{"Role": m["role"], "Content": m["content"]} for m in messages]))
    out = subprocess.run(["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt"),
                          str(tmp_path / "messages.json")], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin:/usr/local/go/bin",
                                                        "HOME": str(tmp_path),
                                                        "GOCACHE": str(tmp_path / "gocache")})
    return out.stdout


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (Ollama's template engine)")
@pytest.mark.parametrize("template", ["smollm2", "gemma"])
def test_modelfile_template_renders_conversations_as_the_chat_template(template, tokenizer,
                                                                       tmp_path):
    import copy

    tok = copy.copy(tokenizer)
    if template == "gemma":
        tok.chat_template = GEMMA_STYLE
    layout = ollama.chat_layout(tok)
    assert layout is not None and layout.system_in_user == (template == "gemma")
    go = ollama.go_template(layout)
    for messages in CONVERSATIONS:
        with_system = messages if messages[0]["role"] == "system" or not layout.default_system \
            else [{"role": "system", "content": layout.default_system}] + messages
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if tok.bos_token and want.startswith(tok.bos_token) and len(
                tok("a")["input_ids"]) > len(tok("a", add_special_tokens=False)["input_ids"]):
            want = want[len(tok.bos_token):]
        assert _go_render(tmp_path, go, with_system) == want


def test_modelfile_stops_and_default_system(tokenizer):
    text = ollama.modelfile("model.Q4_K_M.gguf", tokenizer)
    assert "SYSTEM \"\"\"You are a helpful AI assistant named SmolLM" in text
    assert text.count("PARAMETER stop") == 2


def test_cli_exports_gguf_and_reports_bad_methods(smollm2_dir, tmp_path):
    from fastlora_jax.cli import main
    from tests.checkpoints import tiny_chat_model

    ckpt = tiny_chat_model(tmp_path / "ckpt", smollm2_dir)
    model, tok = FastLanguageModel.from_pretrained(ckpt, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--model", str(ckpt), "--adapter", str(tmp_path / "adapter"),
                 "--output_dir", str(tmp_path / "q4"), "--method", "gguf",
                 "--quantization", "q4_k_m"]) == 0
    reader = gguf.GGUFReader(tmp_path / "q4" / "model.Q4_K_M.gguf")
    assert _fields(reader)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert main(["export", "--model", str(ckpt), "--adapter", str(tmp_path / "adapter"),
                 "--output_dir", str(tmp_path / "lora"), "--method", "gguf", "--lora"]) == 0
    assert (tmp_path / "lora" / "adapter.gguf").is_file()
    assert main(["export", "--model", str(ckpt), "--output_dir", str(tmp_path / "bad"),
                 "--method", "gguf", "--quantization", "q9_9"]) == 2
    assert main(["export", "--model", str(ckpt), "--output_dir", str(tmp_path / "bad"),
                 "--method", "gguf", "--lora"]) == 2
    assert not (tmp_path / "bad").exists()
    assert issubclass(ExportError, FastLoRAError)
