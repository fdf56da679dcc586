"""The GRPO benchmark's pieces: the synthetic tokenizer the trainers share, the reward, the
rows' orientation, our side end to end on the tiny random Llama (the GPU path's smoke), and
Tunix's side on the same tiny model in its own environment (the smoke of its driver)."""

from __future__ import annotations

import math

import pytest

import common  # siblings: pytest puts benchmarks/ on the path for these tests
import grpo
import grpo_trl


def test_synthetic_tokenizer_round_trips_token_prompts():
    tok = grpo_trl.synthetic_tokenizer(512)
    prompt = grpo_trl.token_prompts(1, 8, 512)[0]
    ids = tok(prompt)["input_ids"]
    assert len(ids) == 8 and all(3 <= i < 512 for i in ids)
    assert tok.decode(ids) == prompt
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert grpo_trl.reward_even([[2, 3, 4, 6], [1]]) == [0.75, 0.0]


def test_rows_put_ours_over_theirs_and_leave_a_missing_baseline_empty():
    ours = {"step_s": 2.0, "rollout_s": 1.5, "update_s": 0.5, "peak_bytes": 2**30,
            "peak_rss_bytes": 2**31, "mean_length": 10.0}
    theirs = dict(ours, step_s=8.0, rollout_s=7.0, update_s=1.0, peak_bytes=2**32)
    rows = {r["metric"]: r for r in grpo.rows(ours, theirs, 64, "c", "TRL", gpu=True)}
    assert rows["samples/s"]["ours"] == 32 and rows["samples/s"]["ratio"] == 4.0
    assert rows["rollout s"]["ratio"] == 7.0 / 1.5
    assert rows["peak HBM (GiB)"]["ratio"] == 4.0
    alone = grpo.rows(ours, None, 64, "c", "TRL", gpu=False)
    assert all(r["baseline"] is None and r["ratio"] is None for r in alone)


def test_our_side_runs_the_tiny_random_preset(tmp_path):
    a = dict(preset="tiny", model="", config=common.TINY_LLAMA, quant="nf4", device="cpu",
             remat=False, targets=list(common.LORA_TARGETS), out=str(tmp_path),
             **grpo.DEFAULTS["tiny"])
    out = grpo.run_ours(a)
    assert out["step_s"] > 0 and 0 < out["rollout_s"] < out["step_s"]
    assert math.isclose(out["rollout_s"] + out["update_s"], out["step_s"])
    assert 1 <= out["mean_length"] <= a["completion"] and out["peak_rss_bytes"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not grpo.TUNIX_PYTHON.exists(),
                    reason="no .benchenv/tunix (benchmarks/tunix_env.sh makes it)")
def test_tunix_side_runs_the_tiny_random_preset(tmp_path):
    """Tunix's GRPOLearner, driven as the smollm2 run drives it, in its own environment."""
    a = dict(preset="tiny", model="", config=common.TINY_LLAMA, quant="float32", device="cpu",
             remat=False, targets=list(common.LORA_TARGETS), out=str(tmp_path),
             **grpo.DEFAULTS["tiny"])
    out, why = grpo.side(str(grpo.TUNIX_PYTHON), "tunix", a, timeout=600)
    assert out is not None, why
    assert out["step_s"] > 0 and 0 < out["rollout_s"] < out["step_s"]
    assert math.isclose(out["rollout_s"] + out["update_s"], out["step_s"])
    assert 1 <= out["mean_length"] <= a["completion"] and out["peak_rss_bytes"] > 0
    assert out["versions"]["google-tunix"] and out["versions"]["qwix"]
