"""The benchmarks' shared plumbing (benchmarks/common.py): rows orient their ratio so that higher
is better, the envelope names commit / device / versions, files land where RESULTS.md says, and
the markdown table shows every row."""

from __future__ import annotations

import json

import pytest

import common  # a sibling: pytest puts benchmarks/ on the path for these tests


def test_row_ratio_orientation():
    assert common.row("c", "tokens/s", 300.0, "b", 100.0)["ratio"] == pytest.approx(3.0)
    assert common.row("c", "GiB", 4.0, "b", 8.0, higher_is_better=False)["ratio"] == 2.0
    assert common.row("c", "x", None, "b", 8.0)["ratio"] is None
    assert common.row("c", "x", 1.0, "b", 2.0, target=1.0, tuning="T")["tuning"] == "T"


def test_envelope_and_write(tmp_path):
    doc = common.envelope("bench", device="dev", versions={"jax": "0"}, commit="abc", note="n")
    assert (doc["benchmark"], doc["commit"], doc["device"], doc["note"]) == ("bench", "abc",
                                                                             "dev", "n")
    assert doc["rows"] == [] and doc["versions"] == {"jax": "0"}
    doc["rows"].append(common.row("c", "m", 1.0, "b", 2.0))
    path = common.write(doc, tmp_path, tag="t")
    assert path.name == f"bench-{doc['date']}-t.json"
    assert json.loads(path.read_text())["rows"][0]["ratio"] == 0.5


def test_markdown_table_has_every_row():
    rows = [common.row("a", "tokens/s", 12345.0, "HF", 6000.0, target=2.2),
            common.row("b", "GiB", None, "HF", 12.9, higher_is_better=False)]
    lines = common.markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| case | metric")
    assert "| a | tokens/s | 12,345 | HF: 6,000 | 2.06x | 2.2 |" == lines[2]
    assert "—" in lines[3]


def test_projection_shapes_of_llama3_8b():
    shapes = common.projection_shapes(common.LLAMA3_8B)
    assert shapes["gate_proj"] == (4096, 14336) and shapes["k_proj"] == (4096, 1024)
    assert shapes["down_proj"] == (14336, 4096)


def test_cpu_step_result_rows(tmp_path):
    path = common.write_cpu_step_vs_torch("bench", "case", 0.5, 2.0, 100, 2, out=tmp_path,
                                          note="n")
    doc = json.loads(path.read_text())
    assert "torch threads 2" in doc["device"] and len(doc["load_average"]) == 3
    assert [r["ratio"] for r in doc["rows"]] == [4.0, 4.0]
    assert doc["rows"][1]["ours"] == 200.0 and doc["note"] == "n"
