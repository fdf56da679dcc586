"""Summarise Mosaic GPU in-kernel profiler traces (turned on by kernels/mgpu_profile.py).

Usage: python benchmarks/mgpu_trace.py DIR [DIR ...]

Each `*-trace.json` under DIR is one kernel launch: Chrome-trace begin/end events of the
kernel's named regions, one line (`tid`) per warpgroup of every CTA. For each launch this prints,
per region: how often it ran, its mean duration, its total, and its share of the traced time of
the warpgroups that ran it (the span from their first to their last event). Regions nest
(a wait inside a matmul step); each is timed inclusively. Only the first events of every
warpgroup are kept (`PROFILE_EVENTS`), so the figures describe the start of each CTA's loop.
Durations are SM clock cycles: the profiler reads `%clock` (the trace's `ts` is cycles / 1000).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib


def region_stats(trace: dict) -> list[dict]:
    """Per region: name, count, mean_cycles, total_kcycles, share (of its warpgroups' traced
    span)."""
    stacks: dict[int, list[tuple[str, float]]] = collections.defaultdict(list)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    tids_of: dict[str, set[int]] = collections.defaultdict(set)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for e in trace["traceEvents"]:
        tid, ts = e["tid"], float(e["ts"])
        first[tid] = min(first.get(tid, ts), ts)
        last[tid] = max(last.get(tid, ts), ts)
        if e["ph"] == "B":
            stacks[tid].append((e["name"], ts))
        elif e["ph"] == "E" and stacks[tid]:
            name, t0 = stacks[tid].pop()
            durations[name].append(ts - t0)
            tids_of[name].add(tid)
    rows = []
    for name, ds in durations.items():
        span = sum(last[t] - first[t] for t in tids_of[name])
        rows.append(dict(name=name, count=len(ds), mean_cycles=1e3 * sum(ds) / len(ds),
                         total_kcycles=sum(ds), share=sum(ds) / span if span > 0 else 0.0))
    return sorted(rows, key=lambda r: -r["total_kcycles"])


def summarize(directory: pathlib.Path) -> list[tuple[str, list[dict]]]:
    """(file name, region_stats) for every trace under `directory`, in launch order."""
    paths = sorted(directory.rglob("*-trace.json"),
                   key=lambda p: int(p.name.split("-")[0]) if p.name[0].isdigit() else 0)
    return [(str(p.relative_to(directory)), region_stats(json.loads(p.read_text())))
            for p in paths]


def format_summary(directory: pathlib.Path) -> str:
    lines = []
    for name, rows in summarize(directory):
        lines.append(f"{name}:")
        lines.append(f"  {'region':24s} {'count':>7s} {'mean cycles':>11s} "
                     f"{'total kcycles':>13s} {'share':>6s}")
        for r in rows:
            lines.append(f"  {r['name'][:24]:24s} {r['count']:7d} {r['mean_cycles']:11.0f} "
                         f"{r['total_kcycles']:13.1f} {r['share']:6.1%}")
    return "\n".join(lines) if lines else f"no *-trace.json under {directory}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dirs", nargs="+", type=pathlib.Path)
    for d in parser.parse_args().dirs:
        print(format_summary(d))


if __name__ == "__main__":
    main()
