"""What every benchmark shares: the result file, the model presets, the targets and the table.

A benchmark writes benchmarks/results/<name>-<date>[-<tag>].json, `envelope(...)` plus its rows:
  {benchmark, date, commit, device, versions: {jax: ..., ...}, rows: [...], <extra fields>}
each row {case, metric, ours, baseline_name, baseline, ratio, target, <extra>}, ratio > 1
meaning ours is better whichever way the metric points (`row`). `markdown_table` prints rows as
benchmarks/RESULTS.md shows them.

Only the standard library is imported here: the HF / torch side (e2e_hf.py, run by another
Python) shares the presets too. The benchmarks import this module as a sibling (their folder is
on sys.path when they run as scripts).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# ---- model presets (HF config dicts) ------------------------------------------------------------
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# The same architecture, small enough for a CPU smoke run.
TINY_LLAMA = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(K, N) = (in, out) features of each projection of one layer."""
    h, i, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# ---- targets (the goals each benchmark is held to) ----------------------------------------------
TARGETS = {
    "attention fwd+bwd vs cuDNN": 1.0,         # causal, 2K-16K tokens
    "attention packed vs cuDNN": 10.0,         # 8 documents per 4096-token row, fwd+bwd
    "quantized matmul TF/s": 600.0,            # training shapes (M = 8192), and >= 1.0x the faster
    "quantized matmul decode GB/s": 3000.0,    # weight bytes read per second at M <= 16
    "e2e tokens/s vs HF": 2.2,                 # Llama-3-8B QLoRA step vs HF + PEFT + bitsandbytes
    "e2e tokens/s vs plain XLA": 1.15,
    "e2e lean memory vs HF": 2.0,              # theirs / ours peak HBM
    "e2e MFU": 0.66,
    "e2e compile s": 30.0,
    "e2e max context tokens": 524288,
}
H200_BF16_FLOPS = 766e12  # dense bf16 peak used for MFU


# ---- the result file ----------------------------------------------------------------------------
def git_commit(explicit: str = "") -> str:
    """`explicit` if given (a device's checkout may report a stale HEAD), else the short HEAD."""
    if explicit:
        return explicit
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO).stdout.strip()


def envelope(benchmark: str, *, device: str, versions: dict[str, str], commit: str = "",
             **fields) -> dict:
    """The top of a result file; `rows` starts empty."""
    return {"benchmark": benchmark, "date": datetime.date.today().isoformat(),
            "commit": git_commit(commit), "device": device, "versions": versions, **fields,
            "rows": []}


def jax_envelope(benchmark: str, *, commit: str = "", **fields) -> dict:
    """`envelope` for a benchmark run by our JAX: the first device's kind and jax's version."""
    import jax

    return envelope(benchmark, device=str(jax.devices()[0].device_kind),
                    versions={"jax": jax.__version__}, commit=commit, **fields)


def write_cpu_step_vs_torch(benchmark: str, case: str, ours_s: float, torch_s: float,
                            tokens: int, torch_threads: int, out: pathlib.Path = RESULTS,
                            tag: str = "", extra_rows: list[dict] = (), **fields) -> pathlib.Path:
    """A CPU training-step benchmark's result (ours vs transformers + PEFT on torch in the same
    run: median step time and tokens/s, with the load average, then `extra_rows`), written as
    <benchmark>-<date>[-<tag>].json and printed."""
    import os
    import platform

    import jax

    doc = envelope(benchmark,
                   device=f"CPU {platform.processor() or platform.machine()}, "
                          f"{jax.device_count()} JAX device(s), torch threads {torch_threads}",
                   versions={"jax": jax.__version__}, load_average=os.getloadavg(), **fields)
    base = "HF transformers + PEFT (torch CPU)"
    doc["rows"] = [
        row(case, "median step time (s)", ours_s, base, torch_s, higher_is_better=False,
            target=1.0),
        row(case, "tokens/s", tokens / ours_s, base, tokens / torch_s, target=1.0),
        *extra_rows]
    path = write(doc, out, tag)
    print(markdown_table(doc["rows"]))
    print(f"wrote {path}")
    return path


def result_path(doc: dict, out: pathlib.Path = RESULTS, tag: str = "") -> pathlib.Path:
    return pathlib.Path(out) / f"{doc['benchmark']}-{doc['date']}{'-' + tag if tag else ''}.json"


def write(doc: dict, out: pathlib.Path = RESULTS, tag: str = "") -> pathlib.Path:
    """Write the result file (again after every case: a run cut short keeps what it measured)."""
    path = result_path(doc, out, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def row(case: str, metric: str, ours: float | None, baseline_name: str,
        baseline: float | None, *, higher_is_better: bool = True,
        target: float | str | None = None, **extra) -> dict:
    """One result row; ratio = ours / baseline (or baseline / ours when lower is better), None
    when either side is missing."""
    ratio = None
    if ours and baseline:
        ratio = ours / baseline if higher_is_better else baseline / ours
    return {"case": case, "metric": metric, "ours": ours, "baseline_name": baseline_name,
            "baseline": baseline, "ratio": ratio, "target": target, **extra}


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as RESULTS.md's table: case, metric, ours, baseline, ratio, target."""
    lines = ["| case | metric | ours | baseline | ratio | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['case']} | {r['metric']} | {_fmt(r['ours'])} | "
                     f"{r['baseline_name']}: {_fmt(r['baseline'])} | {ratio} | "
                     f"{_fmt(r.get('target'))} |")
    return "\n".join(lines)
