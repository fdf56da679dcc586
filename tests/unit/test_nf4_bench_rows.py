"""The nf4_matmul benchmark's decode rows (GPU times -> ratios against baselines and the target)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import nf4_matmul as bench  # noqa: E402


def test_decode_rows_ratios_and_target() -> None:
    us = {"mgpu T": 25.0, "bf16 GEMM": 40.0, "XLA dequant+dot": 200.0}
    rows = bench.decode_rows("nf4 M=1 fwd, GPU time", us, "mgpu T", "triton X", 30_000_000, "T")
    by_base = {r["baseline_name"]: r for r in rows}
    assert set(by_base) == {"bf16 GEMM (bf16 weights)", "XLA dequant+dot", "decode target"}
    assert by_base["bf16 GEMM (bf16 weights)"]["ratio"] == pytest.approx(1.6)
    assert by_base["XLA dequant+dot"]["ratio"] == pytest.approx(8.0)
    gbs = by_base["decode target"]
    assert gbs["ours"] == pytest.approx(1200.0)                 # 30 MB in 25 us
    assert gbs["ratio"] == pytest.approx(1200.0 / bench.DECODE_GBS_TARGET)
    assert all(r["tuning"] == "T" and r["us_ours"] == 25.0 for r in rows)


def test_decode_rows_empty_without_our_time() -> None:
    assert bench.decode_rows("c", {"bf16 GEMM": 40.0}, "mgpu T", "triton X", 1, "T") == []


def test_decode_rows_without_a_triton_baseline() -> None:
    """The dx rows: ours is the Triton kernel, so no row compares it with itself."""
    us = {"triton T": 30.0, "bf16 GEMM": 45.0, "XLA dequant+dot": 120.0}
    rows = bench.decode_rows("nf4 M=1 bwd, GPU time", us, "triton T", None, 30_000_000, "T")
    assert [r["baseline_name"] for r in rows] == ["bf16 GEMM (bf16 weights)", "XLA dequant+dot",
                                                  "decode target"]
    assert rows[0]["ratio"] == pytest.approx(1.5)
