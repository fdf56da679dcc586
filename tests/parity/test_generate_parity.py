"""Generation against transformers itself (reference environment, torch CPU, float32):
greedy `generate` token for token on the tiny model of every family and on real weights, and
the sampling processors on random logits."""

from __future__ import annotations

import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.generation.sampling import SamplingConfig, process_logits
from tests.parity.test_families_parity import BASE, CASES
from tests.parity.test_gemma3_real import gemma3_dir  # noqa: F401 (the fixture)
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

# Every family case (sliding windows 5-7, softcaps, Gemma 3 local rope, Phi-3 LongRoPE with
# original context 16, Qwen2 sliding top layers, q/k norms) plus Llama with llama3 and dynamic
# rope (dynamic: growing past max_position_embeddings=16 while decoding).
GEN_CASES = dict(CASES, **{
    "llama_llama3_rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(BASE, tie_word_embeddings=True, max_position_embeddings=64,
                               rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=16))),
    "llama_dynamic_rope": ("LlamaConfig", "LlamaForCausalLM",
                           dict(BASE, max_position_embeddings=16,
                                rope_scaling=dict(rope_type="dynamic", factor=2.0))),
})
PROMPT_LENGTHS, NEW = (7, 3), 20    # 27 and 23 tokens: past every window and past 16

HF_GENERATE = """
import torch, pathlib, transformers
for name, (cfg_cls, model_cls, kwargs) in ARGS["cases"].items():
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    folder = pathlib.Path(ARGS["root"]) / name
    model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.eos_token_id = None          # every row makes NEW tokens
    for i, n in enumerate(ARGS["lengths"]):
        ids = torch.tensor(INPUTS["ids"][i:i + 1, :n]) % kwargs["vocab_size"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=ARGS["new"], pad_token_id=0)
        OUTPUTS[f"{name}/{i}"] = out[0, n:].numpy()
"""


@pytest.fixture(scope="module")
def hf_generations(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_generate")
    ids = np.random.default_rng(11).integers(0, 10_000, size=(2, max(PROMPT_LENGTHS)))
    out = run_reference(HF_GENERATE, {"ids": ids}, cases=GEN_CASES, root=str(root),
                        lengths=PROMPT_LENGTHS, new=NEW)
    return root, ids, out


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_greedy_generation_equals_transformers(hf_generations, case):
    """Both prompts in one ragged batch (ours) against transformers' unbatched generate."""
    root, ids, ref = hf_generations
    vocab = GEN_CASES[case][2]["vocab_size"]
    model, _ = FastLanguageModel.from_pretrained(root / case, dtype="float32")
    rows = [(ids[i, :n] % vocab).tolist() for i, n in enumerate(PROMPT_LENGTHS)]
    out = model.generate(rows, max_new_tokens=NEW, eos_token_id=[])
    for i in range(len(rows)):
        assert out.tokens[i] == ref[f"{case}/{i}"].tolist(), f"prompt {i}"
    assert len(set(out.tokens[0] + out.tokens[1])) > 1     # not one token repeated


SMOL_GENERATE = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(ARGS["path"], dtype=torch.float32).eval()
model.generation_config.eos_token_id = None
for i, n in enumerate(ARGS["lengths"]):
    ids = torch.tensor(INPUTS["ids"][i:i + 1, :n])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=ARGS["new"], pad_token_id=0)
    OUTPUTS[str(i)] = out[0, n:].numpy()
"""


def _chat_ids(tokenizer, messages: list[str]) -> list[list[int]]:
    out = []
    for text in messages:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return out


@pytest.mark.slow
def test_smollm2_greedy_generation_equals_transformers(smollm2_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    rows = _chat_ids(tokenizer, ["Write a short poem about the sea.", "What is 2 + 2?"])
    ids = np.zeros((2, max(map(len, rows))), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    ref = run_reference(SMOL_GENERATE, {"ids": ids}, path=str(smollm2_dir),
                        lengths=[len(r) for r in rows], new=32)
    out = model.generate(rows, max_new_tokens=32, eos_token_id=[])
    for i in range(2):
        assert out.tokens[i] == ref[str(i)].tolist(), f"prompt {i}"


@pytest.mark.slow
def test_gemma3_270m_generation_past_its_sliding_window_equals_transformers(gemma3_dir):
    """Real Gemma 3 weights: a 500-token prompt and 40 new tokens cross the 512-token window
    of its local layers while decoding."""
    folder = gemma3_dir
    model, tokenizer = FastLanguageModel.from_pretrained(folder, dtype="float32",
                                                         max_seq_length=1024)
    assert model.config.sliding_window == 512
    text = " ".join(f"Item {i} of the list is the colour number {i * 7 % 13}." for i in range(40))
    row = tokenizer(text)["input_ids"][:500]
    ids = np.asarray([row], np.int64)
    ref = run_reference(SMOL_GENERATE, {"ids": ids}, path=str(folder), lengths=[500], new=40)
    out = model.generate([row], max_new_tokens=40, eos_token_id=[])
    assert out.tokens[0] == ref["0"].tolist()


HF_PROCESSORS = """
import torch, transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2))
ids = torch.tensor(INPUTS["input_ids"])
for name, cfg in ARGS["configs"].items():
    config = GenerationConfig(**cfg)             # what generate() does with unset options:
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    procs = model._get_logits_processor(generation_config=config,
                                        input_ids_seq_length=ids.shape[1], device="cpu",
                                        model_kwargs={})
    OUTPUTS[name] = procs(ids, torch.tensor(INPUTS["logits"])).numpy()
    OUTPUTS[name + "/kinds"] = np.array([type(p).__name__ for p in procs])
"""
CONFIGS = {
    "penalty_greedy": dict(repetition_penalty=1.3),
    "temperature": dict(do_sample=True, temperature=0.7, top_k=0),
    "top_k": dict(do_sample=True, top_k=7),
    "top_p": dict(do_sample=True, top_k=0, top_p=0.8),
    "min_p": dict(do_sample=True, top_k=0, min_p=0.1),
    "all": dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                repetition_penalty=1.2),
    "defaults_sampling": dict(do_sample=True),            # transformers' default top_k=50
}


def test_logits_processors_equal_transformers():
    """Random logits (several rows, repeated ids in the inputs): our processed scores equal
    transformers' `_get_logits_processor` output exactly (same -inf set, same finite values)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    input_ids = rng.integers(0, 300, size=(4, 12)).astype(np.int64)
    ref = run_reference(HF_PROCESSORS, {"logits": logits, "input_ids": input_ids},
                        configs=CONFIGS)
    assert ref["all/kinds"].tolist() == [        # transformers' order, which ours follows
        "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
        "TopPLogitsWarper", "MinPLogitsWarper"]
    seen = np.zeros((4, 300), bool)
    seen[np.arange(4)[:, None], input_ids] = True
    for name, cfg in CONFIGS.items():
        ours = np.asarray(process_logits(logits, SamplingConfig(**cfg), seen))
        expected = ref[name]
        assert np.array_equal(np.isinf(ours), np.isinf(expected)), name
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(ours[finite], expected[finite], err_msg=name)
        kept = finite.sum(axis=1)
        if cfg.get("do_sample"):
            assert (kept < 300).all() or name == "temperature", (name, kept)
