"""The end-to-end benchmark's pieces: its plain-XLA baseline is the same model as ours, its
report orients every ratio so that higher is better, and our side runs end to end (tiny model)."""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.models.registry import config_from_hf
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, loss_sums

import common  # siblings: pytest puts benchmarks/ on the path for these tests
import e2e_jax
import e2e_plain_xla as px
import train_e2e


def test_plain_xla_baseline_is_our_model():
    """Same weights and adapters -> the hand-written step's loss and LoRA grads equal ours."""
    raw = common.TINY_LLAMA
    config = config_from_hf(raw)
    frozen = decoder.init_params(config, jax.random.key(0))
    spec = resolve(LoraConfig.create(r=4, lora_alpha=8, init_lora_weights=False), config,
                   tuple(n for _, n in PROJECTIONS))
    lora = init_lora(spec, config, frozen)
    layers = frozen["layers"]
    theirs = {"embed": frozen["embed_tokens"]["weight"], "head": frozen["lm_head"]["weight"],
              "final_norm": frozen["norm"]["weight"],
              "ln1": layers["input_layernorm"]["weight"],
              "ln2": layers["post_attention_layernorm"]["weight"]}
    their_lora = {}
    for group, name in spec.targets:
        short = name.removesuffix("_proj")
        theirs[short] = layers[group][name]["weight"]
        entry = lora["layers"][group][name]
        their_lora[short] = {"A": entry["lora_A"], "B": entry["lora_B"]}
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, (2, 24)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), IGNORE, np.int32)], axis=1)
    mb = {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
          "positions": jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))}
    cfg = StepConfig(model=config, lora=spec, remat=False, loss_chunk=16)

    ours_loss, ours_grads = jax.value_and_grad(
        lambda lo: loss_sums(cfg, lo, frozen, mb, None)[0])(lora)
    their_loss, their_grads = jax.value_and_grad(
        lambda lo: px.loss_fn(lo, theirs, mb["input_ids"], mb["targets"], raw, 8 / 4, 16)
    )(their_lora)
    np.testing.assert_allclose(their_loss, ours_loss, rtol=1e-5)
    for group, name in spec.targets:
        short = name.removesuffix("_proj")
        for ours_key, their_key in (("lora_A", "A"), ("lora_B", "B")):
            np.testing.assert_allclose(their_grads[short][their_key],
                                       ours_grads["layers"][group][name][ours_key],
                                       rtol=1e-4, atol=1e-5)


def test_report_rows_orient_ratios_higher_is_better():
    raw = {"ours_fast": {"tokens_per_s": 300.0, "peak_bytes": 4 * 2**30, "compile_s": 10.0,
                         "lora_params": 1000},
           "hf_nf4": {"tokens_per_s": 100.0, "peak_bytes": 8 * 2**30},
           "plain_xla": {"tokens_per_s": 200.0, "compile_s": 5.0},
           "ctx_ours": {"max_fits": 4096}, "ctx_hf": {"max_fits": 1024}}
    rows = {(r["case"], r["metric"], r["baseline_name"]): r
            for r in train_e2e.rows(raw, common.TINY_LLAMA, 64)}
    by_metric = {}
    for (case, metric, base), r in rows.items():
        if r["ratio"] is not None:
            by_metric.setdefault((case.split(":")[0], metric), []).append(r["ratio"])
    assert sorted(by_metric[("fast", "tokens/s")]) == [1.5, 3.0]  # vs plain XLA, vs HF
    assert by_metric[("fast", "peak HBM (GiB)")] == [2.0]        # theirs / ours
    assert by_metric[("fast", "first-step compile (s)")] == [0.5]
    assert by_metric[("max context, batch 1 (lean vs HF NF4 + grad. checkpointing)",
                      "tokens")] == [4.0]
    mfu = next(r for r in rows.values() if r["metric"].startswith("MFU"))
    flops = train_e2e.flops_per_token(common.TINY_LLAMA, 64, 1000)
    assert math.isclose(mfu["ours"], flops * 300.0 / train_e2e.PEAK_FLOPS)


@pytest.mark.parametrize("quant,remat", [("nf4", "offload"), ("bf16", "none")])
def test_our_side_runs_end_to_end(quant, remat):
    args = argparse.Namespace(quant=quant, remat=remat, loss_chunk=32, micro_batch=1,
                              accumulation=2, seq=32, steps=2, warmup=1, linear_impl="default")
    result = e2e_jax.run_ours(config_from_hf(common.TINY_LLAMA), args)
    assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
    assert result["losses"][-1] < result["losses"][0]  # it trains
    assert result["tokens_per_s"] > 0 and result["memory"]["device_need_bytes"] > 0
