"""The KV-cache engine against a full recompute, batching, sampling, adapters, NF4 and errors
(tiny random models of the families; parity with transformers is in
tests/parity/test_generate_parity.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel, GenerationError, ModelConfig
from fastlora_jax.generation import Generator
from fastlora_jax.lora.layer import dense
from fastlora_jax.models import decoder
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.kv_cache import cached_hidden_states, init_cache
from fastlora_jax.models.registry import FAMILIES, config_from_hf
from fastlora_jax.quant import quantize_nf4
from tests.parity.test_families_parity import BASE, CASES

MODEL_TYPE = {f.architecture: t for t, f in FAMILIES.items()}
# The families' cases plus Llama (llama3 rope scaling), so that every family has one here.
CASES = dict(CASES, llama_llama3_rope=(
    "LlamaConfig", "LlamaForCausalLM",
    dict(BASE, tie_word_embeddings=True, max_position_embeddings=64,
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=16))))


def tiny(case: str, seed: int = 0) -> CausalLM:
    """A tiny random model of a family case (the parity tests' configs), initialised like
    those: matrices normal(0, 0.2), norms and biases moved 0.3 * normal away from their init."""
    _, model_cls, kwargs = CASES[case]
    cfg = config_from_hf(dict(kwargs, model_type=MODEL_TYPE[model_cls]))
    params = decoder.init_params(cfg, jax.random.key(seed))
    specs = {spec.path: spec for spec in decoder.param_specs(cfg)}
    for i, (path, spec) in enumerate(specs.items()):
        a = decoder.get_path(params, path)
        if "norm" in path[-2] or path[-1] == "bias":
            a = a + 0.3 * jax.random.normal(jax.random.key(seed + 1 + i), a.shape)
        else:
            a = a * 10
        decoder.set_path(params, path, a)
    return CausalLM(cfg, params, max_seq_length=64)


def prompts(vocab: int, lengths: tuple[int, ...], seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("case", ["llama_llama3_rope", "mistral_window", "gemma_mqa_legacy_gelu",
                                  "gemma2_small_caps", "gemma3_local_rope", "phi3_window",
                                  "phi3_longrope_partial", "qwen2_sliding_top_layers",
                                  "qwen3_bias_tied"])
def test_cached_logits_equal_full_recompute(case):
    """Prefill a left-padded ragged batch, then feed tokens one by one: the logits at every
    step equal the forward over each row's whole prefix (float32, <= 1e-4), past the sliding
    windows (5-7) of these models, for every family. (Phi-3 stays within its original context
    of 16 here; crossing it is the engine's business: see the next test.)"""
    model = tiny(case)
    cfg, params = model.config, model.params()
    steps = 8 if case.startswith("phi3") else 16
    lengths, p = (7, 4), 8
    seqs = prompts(cfg.vocab_size, tuple(n + steps for n in lengths))
    start = jnp.asarray([p - n for n in lengths], jnp.int32)
    prompt = jnp.asarray([[0] * (p - n) + s[:n] for s, n in zip(seqs, lengths)], jnp.int32)
    feed = jnp.asarray([s[n:] for s, n in zip(seqs, lengths)], jnp.int32)       # [2, steps]

    def run(tokens, cache, fresh):
        h, cache = cached_hidden_states(cfg, params, tokens, cache, fresh=fresh)
        return decoder.logits_from_hidden(cfg, params, h[:, -1]), cache

    prefill = jax.jit(lambda t, c: run(t, c, True))
    step = jax.jit(lambda t, c: run(t, c, False))
    logits, cache = prefill(prompt, init_cache(cfg, start, 32, jnp.float32))
    out = [logits]
    for i in range(steps):
        logits, cache = step(feed[:, i:i + 1], cache)
        out.append(logits)
    cached = np.stack([np.asarray(o) for o in out], axis=1)                     # [2, steps+1, V]
    width = max(len(s) for s in seqs)                  # right-padded: causal, so harmless
    full = np.asarray(decoder.forward(cfg, params, jnp.asarray(
        [s + [0] * (width - len(s)) for s in seqs], jnp.int32)))
    for row, n in enumerate(lengths):
        expected = full[row, n - 1:n + steps]
        np.testing.assert_allclose(cached[row], expected, atol=1e-4, rtol=0)
    assert np.abs(full).max() > 1.0


def _greedy_by_recompute(cfg: ModelConfig, params, prompt: list[int], n: int):
    """Greedy tokens and their log-probs from full forwards over a fixed buffer (positions of
    the unused tail set to 0, so length-dependent rope sees the real length)."""
    total = len(prompt) + n

    @jax.jit
    def logits_at(buf, length):
        idx = jnp.arange(total)
        pos = jnp.where(idx < length, idx, 0)[None]
        out = decoder.forward(cfg, params, buf[None], positions=pos)[0]
        return jax.lax.dynamic_index_in_dim(out, length - 1, keepdims=False)

    buf, tokens, logps = np.zeros(total, np.int32), [], []
    buf[:len(prompt)] = prompt
    for i in range(n):
        logits = logits_at(jnp.asarray(buf), len(prompt) + i)
        token = int(jnp.argmax(logits))
        tokens.append(token)
        logps.append(float(jax.nn.log_softmax(logits)[token]))
        buf[len(prompt) + i] = token
    return tokens, np.asarray(logps)


def test_greedy_through_the_longrope_switch_equals_recompute():
    """Phi-3 LongRoPE with original context 16: a 6-token prompt and 20 new tokens cross it at
    step 11; the engine recomputes its cache there (as transformers does), so every token and
    log-prob equals the full recompute."""
    model = tiny("phi3_longrope_partial")
    prompt = prompts(model.config.vocab_size, (6,))[0]
    out = model.generate(prompt, max_new_tokens=20, eos_token_id=[], output_logprobs=True)
    tokens, logps = _greedy_by_recompute(model.config, model.params(), prompt, 20)
    assert out.tokens[0] == tokens
    np.testing.assert_allclose(out.logprobs[0], logps, atol=1e-4)
    assert len(set(tokens)) > 3


def test_ragged_batch_rows_equal_their_unbatched_results():
    """Three prompts of different lengths in one call (batch bucket 4, one padding row): each
    row's tokens and log-probs equal generating it alone; EOS ends a row (mask, padding)."""
    model = tiny("gemma3_local_rope")
    rows = prompts(model.config.vocab_size, (9, 3, 6))
    batched = model.generate(rows, max_new_tokens=12, eos_token_id=[], output_logprobs=True)
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=12, eos_token_id=[], output_logprobs=True)
        assert batched.tokens[i] == alone.tokens[0]
        np.testing.assert_allclose(batched.logprobs[i], alone.logprobs[0], atol=1e-5)
    eos = batched.tokens[1][4]               # stop row 1 at its 5th token
    stopped = model.generate(rows, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert stopped.tokens[1] == batched.tokens[1][:batched.tokens[1].index(eos) + 1]
    assert stopped.completion_mask[1].sum() == len(stopped.tokens[1])
    assert (stopped.sequences[1][~stopped.completion_mask[1]] == 0).all()


def test_sampling_seed_top_k_one_and_return_sequences():
    model = tiny("qwen3_bias_tied")
    row = prompts(model.config.vocab_size, (5,))[0]
    greedy = model.generate(row, max_new_tokens=10, eos_token_id=[])
    top1 = model.generate(row, max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=1,
                          temperature=0.7, seed=11)
    assert top1.tokens == greedy.tokens
    kw = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=None, seed=5,
              num_return_sequences=3)
    a, b = model.generate([row, row[:3]], **kw), model.generate([row, row[:3]], **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 6
    assert len({tuple(t) for t in a.tokens[:3]}) > 1          # the 3 samples of prompt 0 differ
    assert a.prompts[:3] == [row] * 3 and a.prompts[3:] == [row[:3]] * 3
    c = model.generate([row, row[:3]], **dict(kw, seed=6))
    assert c.tokens != a.tokens


def test_adapters_unmerged_merged_and_disabled():
    """Unmerged LoRA (default) generates what the merged weights generate; disable_adapters
    generates what the model without adapters generates."""
    model = tiny("mistral_window")
    base = model.generate(prompts(model.config.vocab_size, (5, 8)), max_new_tokens=10,
                          eos_token_id=[], output_logprobs=True)
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    rows = prompts(model.config.vocab_size, (5, 8))
    kw = dict(max_new_tokens=10, eos_token_id=[], output_logprobs=True)
    unmerged = model.generate(rows, **kw)
    merged = model.generate(rows, merge_adapters=True, **kw)
    assert unmerged.tokens == merged.tokens and unmerged.tokens != base.tokens
    np.testing.assert_allclose(unmerged.logprobs, merged.logprobs, atol=1e-4)
    off = model.generate(rows, disable_adapters=True, **kw)
    assert off.tokens == base.tokens
    np.testing.assert_allclose(off.logprobs, base.logprobs, atol=1e-6)
    FastLanguageModel.for_inference(model, merge_adapters=True)
    assert Generator(model).lora is None                     # merged copy, adapters folded in
    assert Generator(model).frozen is Generator(model).frozen    # made once, kept
    assert model.generate(rows, **kw).tokens == merged.tokens
    FastLanguageModel.for_training(model)
    assert Generator(model).lora is not None
    assert Generator(model).frozen is not Generator(model).frozen


def _nf4_model() -> CausalLM:
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=512,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
    params = decoder.init_params(cfg, jax.random.key(0))
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            w = np.asarray(params["layers"][group][name]["weight"]) * 10
            params["layers"][group][name]["weight"] = jax.tree.map(
                jnp.asarray, quantize_nf4(w, dtype="float32"))
    return CausalLM(cfg, params, max_seq_length=64)


def test_nf4_generation_keeps_weights_quantized():
    """An NF4 model's decode loop reads the packed codes and never holds the dense weights:
    its inputs are codes (no float projection), and XLA's buffer plan for the compiled loop
    (inputs excluded) is under a quarter of the dense projections' float32 bytes. (On the CPU
    the fused product still decodes one projection at a time into a transient buffer; nothing
    is hoisted out of the loop as a dense copy.) The tokens equal the dequantized model's."""
    from fastlora_jax.generation import engine

    model = _nf4_model()
    rows = prompts(64, (6,))
    gen = Generator(model)
    spec, inputs = gen.spec_and_inputs(rows, model.generation_config.sampling(), 8, (), 0,
                                       False)
    state = engine.prefill_jit(spec, gen.frozen, None, inputs["prompt"], inputs["start"],
                               jax.random.key(0), inputs["max_new"], inputs["row_ids"],
                               inputs["done"])
    compiled = engine.decode_jit.lower(spec, gen.frozen, None, state, 8).compile()
    dense_bytes = 4 * 4 * 256 * (2 * 256 + 2 * 128 + 3 * 512)    # 4 layers of float32 projections
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < dense_bytes / 4, (temp, dense_bytes)
    floats = [leaf.shape for leaf in jax.tree.leaves(gen.frozen)
              if leaf.ndim == 2 and leaf.dtype == jnp.float32 and leaf.shape[0] > 64]
    assert not floats, floats   # only the embedding [64, 256] is a float matrix
    out = model.generate(rows, max_new_tokens=8, eos_token_id=[])
    dense_model = CausalLM(model.config, jax.tree.map(
        lambda w: dense(w), model.params(), is_leaf=lambda x: hasattr(x, "codes")))
    assert out.tokens == dense_model.generate(rows, max_new_tokens=8, eos_token_id=[]).tokens


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(top_k=-3, do_sample=True), "top_k"),
    (dict(min_p=2.0, do_sample=True), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(eos_token_id=[1, 999]), "eos_token_id"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=60), "max_new_tokens"),
    (dict(prompts=[list(range(1, 71))], max_new_tokens=1), r"longest prompt \(70 tokens\)"),
    (dict(prompts=[]), "empty batch"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 500]]), "outside the model's vocabulary"),
    (dict(prompts="text"), "tokenizer"),
    (dict(top_pp=0.9), "unknown generation option"),
])
def test_bad_input_is_one_clear_error(kwargs, name):
    model = tiny("qwen3_bias_tied")                    # max_seq_length 64, vocab 97
    kwargs = dict(kwargs)
    rows = kwargs.pop("prompts", [[1, 2, 3, 4, 5, 6, 7, 8]])
    with pytest.raises(GenerationError, match=name):
        model.generate(rows, **kwargs)
