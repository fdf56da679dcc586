"""CPU soak: host memory of a long `fastlora-jax train` run stays flat.

Trains a tiny model (2 layers, hidden 32, with SmolLM2's tokenizer and 49,152-token vocabulary)
on the demo's chat task for --steps optimizer steps through the CLI, as a user runs it: a log
record and TensorBoard scalars every step, an evaluation and a checkpoint every 100 steps. The
run's resident memory (VmRSS of the process, from /proc) is sampled every 0.2 s next to the step
it had reached (log.jsonl). After --warmup steps (compiles, the first evaluations and
checkpoints done) memory should stop growing: the report gives the median RSS of each 100-step
window, the growth from the first window after warm-up to the last, the least-squares slope over
the rest of the run in MiB per 1,000 steps, and the peak.

Usage: .venv/bin/python benchmarks/soak.py [--steps 1000 --warmup 250] [--out DIR]
Writes benchmarks/results/soak-<date>.json (the rows) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastlora_jax.demo import make_examples, write_jsonl  # noqa: E402
from tests.checkpoints import tiny_chat_model  # noqa: E402

CLI = REPO / ".venv" / "bin" / "fastlora-jax"
SMOLLM2 = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB, or None once it has exited."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def last_step(log: pathlib.Path) -> int:
    """The step of the last complete training record in log.jsonl (0 before the first)."""
    if not log.exists():
        return 0
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        lines = [line for line in f.read().splitlines() if line.endswith(b"}")]
    for line in reversed(lines):
        record = json.loads(line)
        if "loss" in record and "eval_loss" not in record:
            return int(record["step"])
    return 0


def soak(root: pathlib.Path, *, steps: int, warmup: int, interval: float = 0.2) -> dict:
    """Run the soak under `root`; returns the samples and the summary figures."""
    model = tiny_chat_model(root / "model", SMOLLM2)
    data = write_jsonl(make_examples(400, seed=0), root / "train.jsonl")
    held_out = write_jsonl(make_examples(32, seed=1, held_out=True), root / "held_out.jsonl")
    out = root / "run"
    cmd = [str(CLI), "train", "--model", str(model), "--data", str(data), "--eval_data",
           str(held_out), "--output_dir", str(out), "--max_steps", str(steps),
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
           "--max_seq_length", "64", "--packing", "true", "--train_on_responses_only", "true",
           "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "100",
           "--eval_strategy", "steps", "--eval_steps", "100", "--disable_tqdm", "true",
           "--use_gradient_checkpointing", "false", "--r", "8"]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds, step, RSS MiB)
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((time.time() - start, last_step(out / "log.jsonl"), rss))
        time.sleep(interval)
    if proc.returncode != 0:
        raise RuntimeError(f"the soak run failed ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    steady = [(s, r) for _, s, r in samples if s >= warmup]
    if len(steady) < 10:
        raise RuntimeError(f"only {len(steady)} samples after step {warmup}: lengthen the run")
    x, y = np.array(steady, dtype=float).T
    slope = float(np.polyfit(x, y, 1)[0]) * 1000  # MiB per 1,000 steps
    windows = {}  # first step of each 100-step window -> median RSS
    for _, s, r in samples:
        windows.setdefault(s // 100 * 100, []).append(r)
    windows = {w: float(np.median(v)) for w, v in sorted(windows.items())}
    at_warmup = float(np.median([r for s, r in steady if s < warmup + 100]))
    at_end = float(np.median([r for s, r in steady if s >= steps - 100]))
    return {"samples": samples, "steps": steps, "warmup": warmup, "windows": windows,
            "rss_at_warmup_mib": at_warmup, "rss_at_end_mib": at_end,
            "rss_peak_mib": max(r for _, _, r in samples),
            "growth_after_warmup_mib": at_end - at_warmup,
            "slope_mib_per_1000_steps": slope, "runtime_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=250)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="keep the run here")
    ns = parser.parse_args()
    root = ns.out or pathlib.Path(tempfile.mkdtemp(prefix="soak-"))
    root.mkdir(parents=True, exist_ok=True)
    result = soak(root, steps=ns.steps, warmup=ns.warmup)
    load = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    case = f"tiny model, {ns.steps} steps (eval + checkpoint every 100)"
    rows = [
        {"case": case, "metric": f"host RSS growth, steps {ns.warmup}-{ns.warmup + 99} to the "
                                 f"last 100 (median MiB)",
         "ours": round(result["growth_after_warmup_mib"], 1),
         "baseline_name": f"median RSS over steps {ns.warmup}-{ns.warmup + 99} (MiB)",
         "baseline": round(result["rss_at_warmup_mib"], 1),
         "ratio": round(result["rss_at_warmup_mib"] / result["rss_at_end_mib"], 4),
         "target": "ratio >= 0.98 (flat)"},
        {"case": case, "metric": "RSS slope after warm-up (MiB per 1,000 steps)",
         "ours": round(result["slope_mib_per_1000_steps"], 2), "baseline_name": None,
         "baseline": None, "ratio": None, "target": "< 2% of RSS per 1,000 steps"},
        {"case": case, "metric": "peak RSS (MiB)", "ours": round(result["rss_peak_mib"], 1),
         "baseline_name": None, "baseline": None, "ratio": None, "target": None},
    ]
    date = datetime.date.today().isoformat()
    report = {"benchmark": "soak", "date": date, "device": f"CPU ({platform.machine()}, "
              f"{os.cpu_count()} cores), load average {load[0]:.1f}",
              "jax_version": __import__("jax").__version__, "commit": commit, "rows": rows,
              "runtime_s": round(result["runtime_s"], 1),
              "window_median_rss_mib": {str(w): round(r, 1) for w, r in result["windows"].items()},
              "samples": [[round(t, 2), s, round(r, 1)] for t, s, r in result["samples"]]}
    path = REPO / "benchmarks" / "results" / f"soak-{date}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"| metric | ours | baseline | ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['metric']} | {row['ours']} | {row['baseline_name'] or ''} "
              f"{row['baseline'] if row['baseline'] is not None else ''} | {row['ratio'] or ''} |")
    print("median RSS per 100-step window (MiB): " + ", ".join(
        f"{w}: {r:.0f}" for w, r in result["windows"].items()))
    print(f"runtime {result['runtime_s']:.0f} s, load average {load[0]:.1f}; wrote {path}")


if __name__ == "__main__":
    main()
