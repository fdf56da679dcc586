"""The attention benchmark's plumbing on the CPU: variant names map to BlockSizes fields, and the
interleaved timer reports every implementation (or why it could not run)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import attention as bench  # noqa: E402


def test_variant_names_map_to_block_size_fields():
    assert bench.variant_overrides("mosaic_gpu") == {}
    assert bench.variant_overrides("triton") == {}
    assert bench.variant_overrides("mosaic_gpu+nopp+st") == dict(mgpu_pingpong=False,
                                                                  mgpu_bwd_stats_tma=True)
    assert bench.variant_overrides("mosaic_gpu_fused_pair") == dict(mgpu_fused_bwd=True,
                                                                     mgpu_fused_pair_dq=True)
    with pytest.raises(SystemExit, match="unknown variant flag"):
        bench.variant_overrides("mosaic_gpu+fast")
    with pytest.raises(SystemExit, match="only apply to mosaic_gpu"):
        bench.variant_overrides("triton+pp")


def test_interleaved_timing_reports_every_implementation():
    case = bench.Case("tiny", batch=1, seq=64, heads=2, kv_heads=1, head_dim=64, docs=2)
    results = bench.measure_interleaved(["ours:interpret", "xla", "cudnn"], case, reps=2,
                                        inner=1)
    assert list(results) == ["ours:interpret", "xla", "cudnn"]
    for impl in ("ours:interpret", "xla"):
        fwd, fwd_bwd, out, err = results[impl]
        assert err == "" and fwd > 0 and fwd_bwd > 0 and out.shape == (1, 64, 2, 64)
    fwd, fwd_bwd, out, err = results["cudnn"]  # no cuDNN on the CPU: reported, not raised
    assert fwd is None and fwd_bwd is None and out is None and err
