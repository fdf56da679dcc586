"""Our GGUF exports run by llama.cpp (llama-cpp-python, the reference environment).

- f16: llama.cpp's greedy continuation (32 tokens) equals ours on a tiny random model of every
  family (each exercising its quirks: llama3 rope factors, GQA, biases, Gemma norms and
  soft-caps, sliding windows, Gemma 3's per-layer-type rope, Phi-3's fused projections with
  partial LongRoPE, Qwen's biases and q/k norms) and on SmolLM2-135M-Instruct.
- the LoRA adapter GGUF on the f16 base gives the greedy tokens of our merged export.
- llama.cpp's tokenizer gives the HF tokenizer's ids.
Tiny models use SmolLM2's tokenizer; their weights are rounded to float16 first, so the f16 file
is lossless and only the arithmetic differs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel, ModelConfig
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.decoder import param_specs, set_path
from fastlora_jax.models.registry import config_from_hf
from tests.llamacpp_ref import llama_cpp_jobs

pytestmark = pytest.mark.reference

V = 49152  # SmolLM2's vocabulary
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0)
FAMILIES = {
    "llama3_rope_bias": dict(BASE, model_type="llama", hidden_act="silu", attention_bias=True,
                             rope_scaling=dict(rope_type="llama3", factor=8.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=32)),
    "mistral_tied": dict(BASE, model_type="mistral", hidden_act="silu", sliding_window=None,
                         tie_word_embeddings=True),
    "gemma_mqa": dict(BASE, model_type="gemma", head_dim=32, num_key_value_heads=1,
                      hidden_act="gelu_pytorch_tanh"),
    "gemma2_window_caps": dict(BASE, model_type="gemma2", num_hidden_layers=4, head_dim=16,
                               query_pre_attn_scalar=16, sliding_window=8,
                               attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                               hidden_activation="gelu_pytorch_tanh"),
    "gemma3_local_rope": dict(BASE, model_type="gemma3_text", num_hidden_layers=5, head_dim=16,
                              query_pre_attn_scalar=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention", "sliding_attention",
                                           "full_attention"],
                              rope_theta=10000.0, rope_local_base_freq=100.0,
                              rope_scaling=dict(rope_type="linear", factor=2.0),
                              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False),
    "phi3_longrope_partial": dict(BASE, model_type="phi3", hidden_act="silu",
                                  max_position_embeddings=1024,
                                  original_max_position_embeddings=256,
                                  partial_rotary_factor=0.5, sliding_window=None,
                                  rope_scaling=dict(type="longrope",
                                                    short_factor=[1.0, 1.25, 1.5, 2.0],
                                                    long_factor=[2.0, 4.0, 8.0, 16.0])),
    "qwen2_bias": dict(BASE, model_type="qwen2", hidden_act="silu", tie_word_embeddings=False),
    "qwen3_head_dim": dict(BASE, model_type="qwen3", hidden_act="silu", head_dim=24,
                           tie_word_embeddings=True),
}
PROMPT = "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"
NEW = 32


def tiny_model(hf: dict, seed: int) -> CausalLM:
    """A random model whose weights are float16 numbers. Gemma-style models (inputs scaled by
    sqrt(hidden), output tied to the input) get a small embedding, so the blocks move the
    residual stream, and a large final norm, so the logits spread like the others'."""
    config = config_from_hf(hf)
    rng = np.random.default_rng(seed)
    scaled = config.embed_scale is not None
    params: dict = {}
    for spec in param_specs(config):
        if spec.path[-2].endswith("norm"):
            value = (1.0 - config.norm_offset) + 0.1 * rng.standard_normal(spec.shape)
            if scaled and spec.path == ("norm", "weight"):
                value += 9.0
        elif spec.path[-1] == "bias":
            value = 0.1 * rng.standard_normal(spec.shape)
        elif spec.path[0] in ("embed_tokens", "lm_head"):
            value = (0.05 if scaled else 0.5) * rng.standard_normal(spec.shape)
        else:
            value = 2.0 * rng.standard_normal(spec.shape) / np.sqrt(spec.shape[-1])
        set_path(params, spec.path, jnp.asarray(np.float16(value).astype(np.float32)))
    return CausalLM(config, params)


def greedy(model: CausalLM, ids: list[int], n: int = NEW) -> list[int]:
    """Our greedy continuation: n tokens, not stopping at EOS (as the llama.cpp side runs)."""
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[]).tokens[0]


def decisive_model(hf: dict, ids: list[int], first_seed: int,
                   margin: float = 0.03) -> tuple[CausalLM, list[int]]:
    """The first tiny model (seeds from `first_seed`) whose greedy continuation of `ids` is a
    varied one (>= 16 distinct tokens, not a repeated token) that never hinges on a near-tie: at every step the top logit leads the runner-up by `margin`, above the
    float16 noise of llama.cpp's arithmetic near the top (0.01-0.03 measured), so that a mismatch is
    a real difference."""
    for seed in range(first_seed, first_seed + 40):
        model = tiny_model(hf, seed)
        out = greedy(model, ids)
        logits = np.asarray(model(jnp.asarray([ids + out])))[0, len(ids) - 1:-1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        if np.min(top2[:, 1] - top2[:, 0]) > margin and len(set(out)) >= NEW // 2:
            return model, out
    raise AssertionError("no decisive tiny model in 40 seeds")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.slow
def test_f16_greedy_continuation_equals_ours_on_every_family(tokenizer, tmp_path):
    ids = tokenizer(PROMPT)["input_ids"]
    jobs, ours = [], {}
    for i, (name, hf) in enumerate(FAMILIES.items()):
        model, ours[name] = decisive_model(hf, ids, first_seed=10 * i)
        # (folder names become general.name, which llama.cpp reads for Phi-3 token quirks)
        path = model.save_pretrained_gguf(tmp_path / f"model{i}", tokenizer,
                                          quantization_method="f16", show_progress=False)
        # n_ctx 256 (llama.cpp pads it to a multiple of 256): within Phi-3's original context,
        # where llama.cpp picks LongRoPE's short factors (by n_ctx; HF by the sequence length)
        jobs.append(dict(kind="greedy", path=path, ids=ids, n=NEW, n_ctx=256))
    results = llama_cpp_jobs(jobs)
    mismatched = {name: (expected, got.tolist()) for (name, expected), got in
                  zip(ours.items(), results) if got.tolist() != expected}
    assert not mismatched


@pytest.mark.slow
def test_smollm2_f16_greedy_and_lora_adapter_equal_ours(smollm2_dir, tmp_path):
    """SmolLM2: f16 export's greedy continuation; then a LoRA (on q/k too: the rope permutation
    of B's rows; rsLoRA: the scale folded into B) as adapter.gguf on that base equals our merged
    f16 export in llama.cpp and our own greedy."""
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                          "France?"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    base = model.save_pretrained_gguf(tmp_path / "base", tokenizer, quantization_method="f16",
                                      show_progress=False)
    expected_base = greedy(model, ids)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_rslora=True,
                                             init_lora_weights=False, random_state=1)
    adapter = model.save_pretrained_gguf(tmp_path / "lora", save_method="lora",
                                         show_progress=False)
    merged = model.save_pretrained_gguf(tmp_path / "merged", tokenizer,
                                        quantization_method="f16", show_progress=False)
    expected = greedy(model, ids)
    assert expected != expected_base  # the adapter changes the answer
    got_base, got_lora, got_merged = llama_cpp_jobs([
        dict(kind="greedy", path=base, ids=ids, n=NEW),
        dict(kind="greedy", path=base, lora=adapter, ids=ids, n=NEW),
        dict(kind="greedy", path=merged, ids=ids, n=NEW)])
    assert got_base.tolist() == expected_base
    assert got_merged.tolist() == expected
    assert got_lora.tolist() == got_merged.tolist()


TOKENIZER_TEXTS = [
    "Hello world", " Hello world", "  two leading spaces", "trailing spaces   ", "\n", "\n\n\n",
    "\t\ttabs\tand\nnewlines\r\n", "a" * 40, "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé", "Ünïcödé Ζεύς Ωμέγα", "日本語のテキスト", "中文分词测试", "한국어 문장입니다",
    "emoji 😀🎉👍🏽 and 🦙🦙", "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "ελληνικά",
    "numbers 1234567890 3.14159 1e-10", "1 22 333 4444 55555 666666", "$100.00 + €50,5",
    "code: def f(x):\n    return x ** 2\n", "<html><body>text</body></html>",
    "snake_case camelCase PascalCase kebab-case", "email@example.com https://a.b/c?d=e&f=g",
    "it's I'm we'll they've don't", "'quoted' \"double\" `back`", "...!!!???", "----====____",
    "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\n", "<|endoftext|>",
    "text<|im_end|>more", "  <|im_start|>  spaced  <|im_end|>  ", "\u200b zero width",
    "mixed\u00a0nbsp", "tab\there", "CAPS LOCK TEXT", "MiXeD CaSe", "a.b.c.d", "(((nested)))",
    "[1, 2, 3]", "{\"json\": true}", "x" * 3 + " " * 7 + "y", "   ", "\u3000ideographic space",
    "ﬁ ligature", "Åström", "ß straße", "😶‍🌫️ zwj sequence", "🇫🇷 flag",
]


def test_llama_cpp_tokenizer_gives_hf_ids(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = tiny_model(FAMILIES["mistral_tied"], seed=0)
    path = model.save_pretrained_gguf(tmp_path / "tok", tokenizer, quantization_method="f16",
                                      show_progress=False)
    assert len(TOKENIZER_TEXTS) >= 50
    (theirs,) = llama_cpp_jobs([dict(kind="tokenize", path=path, texts=TOKENIZER_TEXTS)])
    for text, got in zip(TOKENIZER_TEXTS, theirs):
        assert got == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_family_configs_are_what_llama_cpp_runs():
    """Guard against a case silently not exercising what it names."""
    configs = {k: config_from_hf(v) for k, v in FAMILIES.items()}
    assert configs["gemma3_local_rope"].local_rope is not None
    assert configs["phi3_longrope_partial"].rope.partial_rotary_factor == 0.5
    assert configs["llama3_rope_bias"].qkv_bias
    assert dataclasses.replace(configs["gemma2_window_caps"]).attn_logit_softcap == 20.0
