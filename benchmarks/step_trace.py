"""Where a compiled step's time goes: a jax.profiler trace summarised by category.

`summarize(trace_dir, hlo_text, steps)` reads the `*.xplane.pb` that `jax.profiler.trace` wrote
(through jax's own reader, `jax.profiler.ProfileData`), keeps the device's op events (GPU: every
kernel and memcpy on the "Stream #" lines of the /device:GPU planes; CPU: the XLA thunks, the
events with an `hlo_op` stat), and puts each into a category:

  gemm            cuBLAS / cuBLASLt custom calls, fusions holding a dot (Triton GEMMs, CPU dots)
  attention       cuDNN's fused attention and our attention kernels
  pallas          our other Pallas / Mosaic kernels (NF4 matmul, dequantization)
  dequant         XLA fusions that read 8-bit codes (NF4 / int8 dequantization)
  copy/transpose  copies, transposes and fusions made only of them, device-to-device memcpys
  slices          dynamic-slice / dynamic-update-slice (a scan's per-layer reads and stacking)
  other fusion    every other XLA fusion (elementwise, reductions, the loss, the optimizer)
  collective      all-reduce / all-gather / reduce-scatter / permutes, NCCL kernels
  host transfer   host <-> device memcpys (offloaded activations)
  other           anything else (control flow, unmatched kernels)
  idle            no device op running: host work, launch gaps, syncs between steps

Control-flow containers (while, conditional, call: on the CPU they are events around their
bodies' ops) are left out. The category comes from the compiled module's HLO (`classify_hlo`: the op named by the event's
`hlo_op` stat, or by the kernel's own name, which XLA derives from the op's) and falls back on
the kernel name. Times are self times (an op's nested ops are taken out) per step; the step is
the span from the first to the last op of the traced steps divided by their number, so host
time between steps counts as idle. Ops on several streams (or CPU threads) at once can sum to
more than the busy time: `overlap_s` says by how much.

Usage: python benchmarks/step_trace.py TRACE_DIR [--hlo FILE] [--steps N]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import warnings

CATEGORIES = ("gemm", "attention", "pallas", "dequant", "copy/transpose", "slices",
              "other fusion", "collective", "host transfer", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")
MOVES = {"copy", "transpose", "copy-start", "copy-done"}
CONTROL = {"while", "conditional", "call"}  # containers: their nested ops are timed themselves
PLUMBING = {"parameter", "bitcast", "reshape", "tuple", "get-tuple-element", "constant",
            "broadcast"}
# Lines a profiler tool may add to a device plane, summarising the kernel lines (not kernels).
DERIVED_LINES = {"XLA Modules", "XLA Ops", "Steps", "Framework Name Scope", "Framework Ops",
                 "Source code", "XLA TraceMe", "TensorFlow Name Scope", "TensorFlow Ops"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w\-.%])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _parse(text: str) -> dict[str, list[tuple[str, str, str, bool]]]:
    """computation name -> [(instruction, opcode, rest of the line, is_root)]."""
    comps: dict[str, list[tuple[str, str, str, bool]]] = {}
    current: list | None = None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            header = _HEADER.match(line)
            current = comps.setdefault(header.group(1), []) if header else None
            continue
        m = _INSTR.match(line)
        if current is None or not m:
            continue
        op = _OPCODE.search(m.group(2))
        current.append((m.group(1), op.group(1) if op else "", m.group(2),
                        line.lstrip().startswith("ROOT")))
    return comps


def _custom_call(rest: str) -> str:
    target = (_TARGET.search(rest) or [None, ""])[1].lower()
    if "cublas" in target or "gemm" in target or "matmul" in target:
        return "gemm"
    if "fmha" in target or "cudnn" in target:
        return "attention"
    if any(k in target for k in ("triton", "mosaic", "pallas")):
        return "attention" if re.search(r"attention|flash|mha", rest.lower()) else "pallas"
    return "other"


def _fusion(body: list[tuple[str, str, str, bool]], rest: str) -> str:
    ops = {op for _, op, _, _ in body}
    if ops & {"dot", "convolution", "scaled-dot"} or "triton_gemm" in rest:
        return "gemm"
    if ops & {"custom-call"}:
        return _custom_call(" ".join(r for _, op, r, _ in body if op == "custom-call"))
    reads_codes = any(op == "parameter" and re.match(r"\(?[us]8\[", r) for _, op, r, _ in body)
    if reads_codes and ops & {"shift-right-logical", "convert", "multiply"}:
        return "dequant"
    if ops & set(COLLECTIVES):
        return "collective"
    work = ops - PLUMBING
    if work and work <= MOVES:
        return "copy/transpose"
    if work and work <= {"dynamic-slice", "dynamic-update-slice"} | MOVES:
        return "slices"
    return "other fusion"


def classify_hlo(text: str) -> dict[str, str]:
    """HLO instruction name -> category, for every instruction of a compiled module's text."""
    comps = _parse(text)
    out: dict[str, str] = {}
    for body in comps.values():
        for name, op, rest, _ in body:
            base = op.removesuffix("-start").removesuffix("-done")
            if base in COLLECTIVES:
                out[name] = "collective"
            elif op == "custom-call":
                out[name] = _custom_call(rest)
            elif op == "fusion":
                called = _CALLS.search(rest)
                out[name] = _fusion(comps.get(called.group(1), []) if called else [], rest)
            elif op in MOVES:
                out[name] = "copy/transpose"
            elif op in ("dynamic-slice", "dynamic-update-slice"):
                out[name] = "slices"
            elif op in ("dot", "convolution"):
                out[name] = "gemm"
            elif op in CONTROL:
                out[name] = "control"
            elif op in PLUMBING:
                out[name] = "other"
            else:
                out[name] = "other fusion" if op else "other"
    return out


def classify_name(name: str) -> str:
    """A kernel's category from its name alone (no HLO op matched)."""
    n = name.lower()
    if "memcpy" in n and ("htod" in n or "dtoh" in n or "h2d" in n or "d2h" in n):
        return "host transfer"
    if "memcpy" in n or "memset" in n or "transpose" in n or re.search(r"\bcopy", n):
        return "copy/transpose"
    if "nccl" in n:
        return "collective"
    if any(k in n for k in ("fmha", "sdpa", "flash", "attention")):
        return "attention"
    if any(k in n for k in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul", "dot")):
        return "pallas" if ("nf4" in n or "int8" in n) else "gemm"
    if any(k in n for k in ("nf4", "pallas", "mosaic")):
        return "pallas"
    if "dynamic_update_slice" in n or "dynamic_slice" in n:
        return "slices"
    if "fusion" in n:
        return "other fusion"
    return "other"


def device_events(trace_dir: pathlib.Path) -> list[dict]:
    """Op events of the device (GPU planes if any, else the CPU's XLA thunks): name, hlo_op,
    hlo_module, line, start_ns, dur_ns."""
    from jax.profiler import ProfileData

    paths = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(str(paths[-1]))
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    events = []
    for plane in gpu or [p for p in data.planes if p.name == "/host:CPU"]:
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        for line in (streams or [ln for ln in lines if ln.name not in DERIVED_LINES]) if gpu \
                else lines:
            for e in line.events:
                with warnings.catch_warnings():  # jaxlib's stats type warns on 3.12
                    warnings.simplefilter("ignore", DeprecationWarning)
                    stats = dict(e.stats)
                if not gpu and "hlo_op" not in stats:
                    continue
                events.append({"name": e.name, "hlo_op": str(stats.get("hlo_op", "")),
                               "hlo_module": str(stats.get("hlo_module", "")),
                               "line": f"{plane.name}/{line.name}",
                               "start_ns": float(e.start_ns), "dur_ns": float(e.duration_ns)})
    return events


def self_times(events: list[dict]) -> None:
    """Adds `self_ns` to each event: its duration minus that of events nested in it (same line)."""
    by_line: dict[str, list[dict]] = collections.defaultdict(list)
    for e in events:
        by_line[e["line"]].append(e)
    for line in by_line.values():
        line.sort(key=lambda e: (e["start_ns"], -e["dur_ns"]))
        stack: list[dict] = []
        for e in line:
            e["self_ns"] = e["dur_ns"]
            end = e["start_ns"] + e["dur_ns"]
            while stack and stack[-1]["start_ns"] + stack[-1]["dur_ns"] <= e["start_ns"]:
                stack.pop()
            if stack and end <= stack[-1]["start_ns"] + stack[-1]["dur_ns"]:
                stack[-1]["self_ns"] -= e["dur_ns"]
            stack.append(e)


def _union_ns(events: list[dict]) -> float:
    spans = sorted((e["start_ns"], e["start_ns"] + e["dur_ns"]) for e in events)
    total, cur_start, cur_end = 0.0, None, None
    for s, t in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, t
        else:
            cur_end = max(cur_end, t)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def _category(e: dict, hlo: dict[str, str]) -> tuple[str, bool]:
    """(category, whether an HLO op of the module gave it)."""
    if "memcpy" in e["name"].lower():
        return classify_name(e["name"]), False
    # XLA names a fusion's kernel after the op, "_" for "."
    for key in (e["hlo_op"], e["name"], re.sub(r"_(\d+)$", r".\1", e["name"])):
        if key and key in hlo:
            return hlo[key], True
    return classify_name(e["hlo_op"] or e["name"]), False


def summarize(trace_dir: pathlib.Path, hlo_text: str = "", steps: int = 1,
              module: str = "", top: int = 25) -> dict:
    """Per-step seconds and % of the step by category, and the top ops (module docstring).
    `module`: keep only events whose hlo_module contains it (others, e.g. a loss readback,
    are dropped) when any does."""
    events = [e for e in device_events(trace_dir) if e["dur_ns"] > 0]
    if module and any(module in e["hlo_module"] for e in events):
        events = [e for e in events if not e["hlo_module"] or module in e["hlo_module"]]
    if not events:
        raise ValueError(f"no device op events in the trace under {trace_dir}")
    hlo = classify_hlo(hlo_text) if hlo_text else {}
    for e in events:
        e["category"], e["matched"] = _category(e, hlo)
    containers = sum(e["category"] == "control" for e in events)
    events = [e for e in events if e["category"] != "control"]
    self_times(events)
    wall = (max(e["start_ns"] + e["dur_ns"] for e in events)
            - min(e["start_ns"] for e in events))
    busy = _union_ns(events)
    by_cat: dict[str, float] = collections.Counter()
    by_op: dict[str, list] = {}
    matched = 0
    for e in events:
        cat = e["category"]
        matched += e["matched"]
        by_cat[cat] += e["self_ns"]
        key = e["hlo_op"] or e["name"]
        entry = by_op.setdefault(key, [cat, 0.0, 0, e["name"]])
        entry[1] += e["self_ns"]
        entry[2] += 1
    per_step = wall / steps
    rows = [{"category": c, "s_per_step": by_cat[c] / steps / 1e9,
             "pct_of_step": 100 * by_cat[c] / wall} for c in CATEGORIES if by_cat[c] > 0]
    rows.append({"category": "idle", "s_per_step": (wall - busy) / steps / 1e9,
                 "pct_of_step": 100 * (wall - busy) / wall})
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "steps": steps, "step_s": per_step / 1e9, "busy_s_per_step": busy / steps / 1e9,
        "overlap_s_per_step": (sum(by_cat.values()) - busy) / steps / 1e9,
        "events": len(events), "events_matched_to_hlo": matched,
        "control_flow_events_left_out": containers,
        "lines": dict(collections.Counter(e["line"] for e in events)),
        "categories": rows,
        "top_ops": [{"op": k, "kernel": v[3], "category": v[0], "s_per_step": v[1] / steps / 1e9,
                     "pct_of_step": 100 * v[1] / wall, "calls_per_step": v[2] / steps}
                    for k, v in ops],
    }


def format_summary(summary: dict) -> str:
    lines = [f"step {summary['step_s'] * 1e3:.1f} ms (device busy "
             f"{summary['busy_s_per_step'] * 1e3:.1f} ms, overlap "
             f"{summary['overlap_s_per_step'] * 1e3:.1f} ms; {summary['events']} events, "
             f"{summary['events_matched_to_hlo']} matched to HLO ops)",
             f"  {'category':16s} {'ms/step':>9s} {'% of step':>9s}"]
    for r in summary["categories"]:
        lines.append(f"  {r['category']:16s} {r['s_per_step'] * 1e3:9.2f} {r['pct_of_step']:8.1f}%")
    lines.append(f"  {'top ops':40s} {'category':15s} {'ms/step':>8s} {'%':>6s} {'calls':>6s}")
    for r in summary["top_ops"]:
        lines.append(f"  {r['op'][:40]:40s} {r['category']:15s} {r['s_per_step'] * 1e3:8.2f} "
                     f"{r['pct_of_step']:5.1f}% {r['calls_per_step']:6.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", type=pathlib.Path)
    parser.add_argument("--hlo", type=pathlib.Path, default=None,
                        help="the compiled module's HLO text (categories by op)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = summarize(args.trace_dir, args.hlo.read_text() if args.hlo else "", args.steps)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))


if __name__ == "__main__":
    main()
