"""The nf4_matmul benchmark's rows (times -> ratios against the baselines and the targets), its
forward + dx timing helper, and one tiny interpreted run of every mode on the CPU."""

from __future__ import annotations

import json

import pytest

import nf4_matmul as bench  # a sibling: pytest puts benchmarks/ on the path for these tests


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


def test_dispatch_rows_ratios_and_targets() -> None:
    secs = {"ours": 2e-3, "xla": 2.5e-3, "bf16": 1.6e-3}
    rows = bench.dispatch_rows("nf4 M=8192 fwd, model default", 8e12, secs, None, {"m": 8192})
    faster, xla = rows
    assert faster["baseline"] == pytest.approx(5000.0)        # the bf16 GEMM: 8 TFLOP in 1.6 ms
    assert faster["ratio"] == pytest.approx(0.8)
    assert "600 TF/s" in faster["target"]
    assert xla["ratio"] == pytest.approx(1.25)
    assert faster["us_ours"] == pytest.approx(2000.0)
    decode = bench.dispatch_rows("nf4 M=1 fwd", 1.0, {"ours": 20e-6, "xla": 1e-4, "bf16": 4e-5},
                                 30_000_000, {"m": 1})
    assert "600" not in decode[0]["target"]
    assert decode[2]["ours"] == pytest.approx(1500.0)           # 30 MB in 20 us
    assert decode[2]["ratio"] == pytest.approx(0.5)


def test_with_dx_is_the_input_gradient() -> None:
    import jax
    import jax.numpy as jnp

    kx, kg, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x, dy = jax.random.normal(kx, (3, 5)), jax.random.normal(kg, (3, 4))
    w = jax.random.normal(kw, (4, 5))
    y, dx = bench.with_dx(lambda a, w: a @ w.T)((x, dy), w)
    assert jnp.allclose(y, x @ w.T) and jnp.allclose(dx, dy @ w, atol=1e-5)


@pytest.mark.parametrize("mode", [[], ["--dispatch"]])
def test_smoke_run_writes_rows(tmp_path, mode) -> None:
    """--smoke on the CPU (interpreted kernels): every mode runs end to end and writes rows."""
    bench.main(["--smoke", "--out", str(tmp_path), "--kinds", "nf4", "--shapes",
                "1x128x64,80x128x64", "--tag", "t", *mode])
    doc = json.loads(next(tmp_path.glob("nf4_matmul-*-t.json")).read_text())
    assert doc["versions"]["jax"] and doc["rows"]
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in doc["rows"])
