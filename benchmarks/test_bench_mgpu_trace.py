"""The Mosaic GPU trace summary (benchmarks/mgpu_trace.py) on a hand-made trace."""

from __future__ import annotations

import json
import pathlib

import pytest

import mgpu_trace  # a sibling: pytest puts benchmarks/ on the path for these tests


def _events(tid: int, regions: list[tuple[str, float, float]]) -> list[dict]:
    out = []
    for name, t0, t1 in regions:
        out += [dict(name=name, ph="B", ts=t0, pid=1, tid=tid),
                dict(name=name, ph="E", ts=t1, pid=1, tid=tid)]
    return sorted(out, key=lambda e: e["ts"])


def test_region_stats_counts_means_and_shares(tmp_path: pathlib.Path) -> None:
    # warpgroup 1: qk twice (1 and 3 kcycles) inside a 10 kcycle span; warpgroup 2: a wait.
    events = (_events(1, [("qk", 0.0, 1.0), ("softmax", 1.0, 2.0), ("qk", 2.0, 5.0),
                          ("pv", 5.0, 10.0)])
              + _events(2, [("wait_free", 0.0, 4.0), ("issue_tma", 4.0, 5.0)]))
    rows = {r["name"]: r for r in mgpu_trace.region_stats({"traceEvents": events})}
    assert rows["qk"]["count"] == 2
    assert rows["qk"]["mean_cycles"] == pytest.approx(2000.0)
    assert rows["qk"]["share"] == pytest.approx(0.4)
    assert rows["wait_free"]["share"] == pytest.approx(0.8)
    assert list(rows)[0] == "pv"  # sorted by total


def test_nested_regions_are_timed_inclusively(tmp_path: pathlib.Path) -> None:
    events = [dict(name="step", ph="B", ts=0.0, tid=1), dict(name="wait", ph="B", ts=1.0, tid=1),
              dict(name="wait", ph="E", ts=3.0, tid=1), dict(name="step", ph="E", ts=4.0, tid=1)]
    rows = {r["name"]: r for r in mgpu_trace.region_stats({"traceEvents": events})}
    assert rows["step"]["mean_cycles"] == pytest.approx(4000.0)
    assert rows["wait"]["mean_cycles"] == pytest.approx(2000.0)


def test_summary_reads_traces_in_launch_order(tmp_path: pathlib.Path) -> None:
    for stamp, name in ((20, "second"), (10, "first")):
        (tmp_path / f"{stamp}-trace.json").write_text(json.dumps(
            {"traceEvents": _events(1, [(name, 0.0, 1.0)])}))
    summary = mgpu_trace.summarize(tmp_path)
    assert [rows[0]["name"] for _, rows in summary] == ["first", "second"]
    text = mgpu_trace.format_summary(tmp_path)
    assert text.index("first") < text.index("second")
    assert "no *-trace.json" in mgpu_trace.format_summary(tmp_path / "empty")


def test_profile_compiler_params() -> None:
    from fastlora_jax.kernels.mgpu_profile import PROFILE_EVENTS, compiler_params
    off = compiler_params()
    assert off.profile_space == 0 and not off.profile_dir and not off.approx_math
    on = compiler_params("/tmp/traces", approx_math=True)
    assert (on.profile_space, on.profile_dir) == (PROFILE_EVENTS, "/tmp/traces")
    assert on.approx_math and on.profile_bounds_check
