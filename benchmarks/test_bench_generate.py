"""The generation benchmark's pieces: our side runs end to end (tiny model), the matvec rows
time both forms, and the rows orient every ratio so that higher means ours is better."""

from __future__ import annotations

import jax
import numpy as np

from fastlora_jax.models import decoder
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.registry import config_from_hf

import common  # siblings: pytest puts benchmarks/ on the path for these tests
import generate


def test_our_side_times_prefill_and_decode():
    config = config_from_hf(common.TINY_LLAMA)
    model = CausalLM(config, decoder.init_params(config, jax.random.key(0)), max_seq_length=64)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 5))
    times, nbytes = generate.time_ours(model, ids, [1, 2], new_tokens=4, repeats=1)
    assert set(times) == {"prefill_1", "decode_1", "prefill_2", "decode_2"}
    assert all(t > 0 for t in times.values())
    embed = config.vocab_size * config.hidden_size         # untied: only gathered, not read
    assert nbytes == 4 * (decoder.num_params(config) - embed)


def test_matvec_rows_time_both_forms():
    rows = generate.matvec_rows({"proj": (128, 64)}, (1,), repeats=1)
    assert [r["case"].split()[0] for r in rows] == ["nf4", "int8"]
    assert all(r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] > 0 for r in rows)


def test_speed_rows_orient_ratios_and_targets():
    times = {"ours": {"prefill_1": 0.1, "decode_1": 1.0}, "hf": {"prefill_1": 0.2,
                                                               "decode_1": 4.0},
             "nf4": {"prefill_1": 0.1, "decode_1": 2.0},
             "llama_cpp": {"prefill_Q4_1": 0.05, "decode_Q4_1": 1.0}}
    rows = generate.speed_rows(times, {"ours": 1000, "nf4": 250}, [1], ["nf4"], 16, 9)
    by = {(r["case"].split(",")[0], r["metric"], r["baseline_name"]): r for r in rows}
    hf = by[("SmolLM2-135M float32", "decode tokens/s", "HF transformers generate (torch CPU)")]
    assert hf["ours"] == 8.0 and hf["ratio"] == 4.0 and hf["target"] == 2.0
    cpp = by[("SmolLM2-135M nf4 frozen weights (float32 compute)", "decode tokens/s",
              "llama.cpp Q4_1 GGUF (llama-cpp-python)")]
    assert cpp["ratio"] == 0.5 and cpp["target"] == 0.5


def test_preset_rows_give_hf_ratios_and_the_roofline_fraction():
    config = config_from_hf(common.LLAMA3_8B)
    times = {"ours": {"prefill_1": 0.1, "decode_1": 0.9, "prefill_8": 0.2, "decode_8": 1.8},
             "hf": {"prefill_1": 0.5, "decode_1": 9.0}}
    rows = generate.preset_rows("L", config, times, 4_000_000_000, [1, 8], 100, 10, 4e12)
    by = {(r["case"].split(",")[2].strip(), r["metric"]): r for r in rows}
    dec = by[("batch 1", "decode tokens/s")]
    assert dec["ours"] == 10.0 and dec["ratio"] == 10.0 and dec["target"] == 10.0
    assert by[("batch 8", "decode tokens/s")]["ratio"] is None         # HF did not run it
    step = by[("batch 1", "decode step ms")]
    kv = 2 * 32 * 1 * 105 * 8 * 128 * 2                                  # bf16 K and V, 105 slots
    assert step["ours"] == 100.0 and step["bytes_per_step"] == 4_000_000_000 + kv
    np.testing.assert_allclose(step["ratio"], (4e9 + kv) / 4e12 / 0.1)
