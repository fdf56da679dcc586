"""The attention benchmark's plumbing on the CPU: the interleaved timer reports every
implementation (or why it could not run), rows take the best of ours against each baseline, and
the tile sweep stays on its backend."""

from __future__ import annotations

import attention as bench  # a sibling: pytest puts benchmarks/ on the path for these tests
import common
from fastlora_jax.kernels.flash_attention import MosaicBlockSizes, TritonBlockSizes


def test_interleaved_timing_reports_every_implementation():
    case = bench.Case("tiny", batch=1, seq=64, heads=2, kv_heads=1, head_dim=64, docs=2)
    results = bench.measure_interleaved(["pallas_triton", "xla", "cudnn"], case, reps=2, inner=1)
    assert list(results) == ["pallas_triton", "xla", "cudnn"]
    for impl in ("pallas_triton", "xla"):
        fwd, fwd_bwd, out, err = results[impl]
        assert err == "" and fwd > 0 and fwd_bwd > 0 and out.shape == (1, 64, 2, 64)
    fwd, fwd_bwd, out, err = results["cudnn"]  # no cuDNN on the CPU: reported, not raised
    assert fwd is None and fwd_bwd is None and out is None and err


def test_case_rows_take_the_best_of_ours():
    case = bench.Case("c", batch=1, seq=64, target_fwd_bwd=1.0)
    results = {"pallas_mosaic": (50.0, 40.0, None, ""), "pallas_triton": (60.0, 30.0, None, ""),
               "cudnn": (100.0, 80.0, None, ""), "xla": (None, None, None, "skipped")}
    rows = bench.case_rows(case, results)
    by = {(r["metric"], r["baseline_name"]): r for r in rows}
    assert by[("fwd+bwd TF/s", "cudnn")]["ours"] == 40.0                # best by fwd+bwd
    assert by[("fwd+bwd TF/s", "cudnn")]["ratio"] == 0.5
    assert by[("fwd+bwd TF/s", "cudnn")]["target"] == 1.0
    assert by[("fwd TF/s", "cudnn")]["ours_impl"] == "pallas_mosaic"
    assert by[("fwd+bwd TF/s", "xla")]["ratio"] is None and by[("fwd+bwd TF/s", "xla")]["note"]
    assert set(rows[0]) >= {"case", "metric", "ours", "baseline_name", "baseline", "ratio",
                            "target"}


def test_sweep_options_stay_on_their_backend():
    assert all(isinstance(b, MosaicBlockSizes) for b in bench.sweep_options("pallas_mosaic", 128))
    assert all(isinstance(b, TritonBlockSizes) for b in bench.sweep_options("pallas_triton", 128))
    assert bench.sweep_options("pallas_triton", 64)[0] == TritonBlockSizes.for_head_dim(64)


def test_cases_use_the_llama3_8b_heads():
    assert (bench.CASES[0].heads, bench.CASES[0].kv_heads, bench.CASES[0].head_dim) == (
        common.LLAMA3_8B["num_attention_heads"], common.LLAMA3_8B["num_key_value_heads"],
        common.LLAMA3_8B["head_dim"])


def test_smoke_run_writes_rows(tmp_path):
    """--smoke on the CPU: the whole script on one tiny packed case, interpreted."""
    import json

    bench.main(["--smoke", "--out", str(tmp_path), "--impls", "pallas_triton"])
    doc = json.loads(next(tmp_path.glob("attention-*.json")).read_text())
    assert doc["rows"] and doc["rows"][0]["ours_impl"] == "pallas_triton"
    assert doc["errors"]["smoke_packed_s128"]["cudnn"]  # no cuDNN on the CPU: reported
