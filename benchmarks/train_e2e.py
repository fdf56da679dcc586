"""End-to-end QLoRA training on one GPU: fastlora_jax vs a plain-XLA JAX step vs HF + PEFT + bnb.

Llama-3-8B's real config with random weights created on the GPU, LoRA r=16 alpha=16 on all seven
projections, seq 2048, micro-batch 2 x accumulation 4 = 16,384 tokens per optimizer step, bf16
compute, AdamW with clipping. Every run is its own process (a clean peak-memory count):
  ours_fast   NF4 frozen weights, no remat (the least rematerialisation: it fits on an H200)
  ours_fast_dense  the same with the frozen matmuls differentiated by JAX's autodiff, which keeps
              every layer's dense dequantized weight for the backward (the path before the
              quantized linear's codes-only backward): the before of that change, same run
  ours_lean   NF4, per-layer remat with the layer inputs offloaded to host, 1024-token loss chunks
  ours_dots   NF4, remat keeping only matmul outputs (the plain-XLA step's policy)
  ours_bf16   bf16 frozen weights, no remat (the bf16 LoRA comparison)
  plain_xla   a hand-written JAX step (benchmarks/e2e_plain_xla.py): bf16, cuDNN, scan
  hf_nf4      HF transformers + PEFT + bitsandbytes NF4 (benchmarks/e2e_hf.py), SDPA,
              non-reentrant gradient checkpointing
  hf_bf16     the same in bf16
  ctx_ours    max context: compile-only memory analysis of the lean step at batch 1 (bisection),
              then one real step at 65,536 tokens to check the prediction
  ctx_hf      max context for HF NF4: real steps at growing lengths until the first OOM
  profile     per-part timings (attention, frozen matmuls, LoRA, elementwise, loss)

Usage (GPU machine, from the repo root after installing the package):
  python3 benchmarks/train_e2e.py --out DIR [--parts ours_fast,hf_nf4,...] [--steps 20]
  python3 benchmarks/train_e2e.py --merge DIR1/train_e2e-raw.json DIR2/... # one report from several
  python3 benchmarks/train_e2e.py --tiny --hf-python .refenv/bin/python   # CPU smoke test
Writes train_e2e-raw.json (every run's output, after each run) and, once every part is there,
train_e2e-<date>.json (common.py's envelope and rows) and train_e2e-<date>.png into --out.

Useful MFU = (4 N_frozen + 6 N_lora + A) x tokens/s / 766e12, with N_frozen the frozen matmul
parameters (decoder projections + lm_head; the embedding lookup does no matmul), 4 = forward +
input-gradient matmuls, 6 = forward + both gradients for LoRA, and A the attention FLOPs per token,
3.5 x 4 x head_dim x heads x layers x (seq + 1) / 2 (causal: half the keys; backward 2.5x forward).
766 TF/s is the bf16 GEMM peak measured on this H200.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import common  # a sibling: benchmarks/ is on the path when a benchmark runs

REPO = common.REPO
PEAK_FLOPS = common.H200_BF16_FLOPS
GIB = 2.0 ** 30
TARGET = common.TARGETS
HF_CTX_LENGTHS = "16384,32768,65536,98304,131072,196608"
OURS_CTX_LENGTHS = "131072,262144,393216,524288"
ALL_PARTS = ("ours_fast", "ours_fast_dense", "ours_lean", "ours_dots", "ours_bf16", "plain_xla",
             "hf_nf4", "hf_bf16", "ctx_ours", "ctx_hf", "profile")
SUMMARY_KEYS = ("tokens_per_s", "peak_bytes", "compile_s", "max_fits", "first_fail", "first_oom",
                "parts_s", "error")


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    jaxpy = [sys.executable, str(REPO / "benchmarks" / "e2e_jax.py")]
    hfpy = [args.hf_python, str(REPO / "benchmarks" / "e2e_hf.py")]
    shape = ["--micro-batch", str(args.micro_batch), "--accumulation", str(args.accumulation),
             "--seq", str(args.seq)]
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    tiny_j = ["--tiny"] if args.tiny else []
    tiny_h = ["--device", "cpu", "--config", json.dumps(common.TINY_LLAMA)] if args.tiny else []
    chunk_all = str(args.micro_batch * args.seq)
    return {
        "ours_fast": jaxpy + ["--run", "ours", "--quant", "nf4", "--remat", "none",
                              "--loss-chunk", chunk_all] + shape + timing + tiny_j,
        "ours_fast_dense": jaxpy + ["--run", "ours", "--quant", "nf4", "--remat", "none",
                                    "--loss-chunk", chunk_all, "--linear-impl", "reference"]
        + shape + timing + tiny_j,
        "ours_lean": jaxpy + ["--run", "ours", "--quant", "nf4", "--remat", "offload",
                              "--loss-chunk", "1024"] + shape + timing + tiny_j,
        "ours_dots": jaxpy + ["--run", "ours", "--quant", "nf4", "--remat", "dots",
                              "--loss-chunk", chunk_all] + shape + timing + tiny_j,
        "ours_bf16": jaxpy + ["--run", "ours", "--quant", "bf16", "--remat", "none",
                              "--loss-chunk", chunk_all] + shape + timing + tiny_j,
        "plain_xla": jaxpy + ["--run", "plain_xla", "--loss-chunk", "1024"] + shape + timing
        + tiny_j,
        "hf_nf4": hfpy + ["--quant", "nf4"] + shape + timing + tiny_h,
        "hf_bf16": hfpy + ["--quant", "bf16"] + shape + timing + tiny_h,
        "ctx_ours": jaxpy + ["--run", "context", "--quant", "nf4", "--loss-chunk", "1024",
                             "--lengths", "128,256,512" if args.tiny else OURS_CTX_LENGTHS,
                             "--verify-seq", "128" if args.tiny else "65536"] + tiny_j,
        "ctx_hf": hfpy + ["--quant", "nf4", "--max-context",
                          "128,256" if args.tiny else HF_CTX_LENGTHS,
                          "--budget-s", str(args.hf_context_budget_s)] + tiny_h,
        "profile": jaxpy + ["--run", "profile", "--quant", "nf4", "--loss-chunk", chunk_all]
        + shape + tiny_j,
    }


def run_parts(args: argparse.Namespace, raw_path: pathlib.Path) -> dict:
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    cmds = commands(args)
    for part in args.parts.split(","):
        print(f"== {part}: {' '.join(cmds[part][1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmds[part], capture_output=True, text=True, cwd=REPO,
                              timeout=args.part_timeout_s)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            raw[part] = json.loads(lines[-1])
            raw[part]["command"] = " ".join(cmds[part][1:])
        else:
            raw[part] = {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
            print(proc.stderr[-3000:], flush=True)
        brief = {k: v for k, v in raw[part].items() if k in SUMMARY_KEYS}
        print(f"   {time.perf_counter() - start:.0f} s: {json.dumps(brief)}", flush=True)
        raw_path.write_text(json.dumps(raw, indent=1))
    return raw


def flops_per_token(cfg: dict, seq: int, lora_params: int) -> float:
    h, i, v, layers = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                       cfg["num_hidden_layers"])
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    frozen = layers * (h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * i) + v * h
    attention = 3.5 * 4 * d * hq * layers * (seq + 1) / 2
    return 4 * frozen + 6 * lora_params + attention


def rows(raw: dict, cfg: dict, seq: int) -> list[dict]:
    def get(part: str, key: str) -> float | None:
        value = raw.get(part, {}).get(key)
        return float(value) if isinstance(value, (int, float)) and value else None

    def row(case: str, metric: str, ours: float | None, base_name: str, base: float | None,
            higher_is_better: bool, target: float | str | None) -> dict:
        return common.row(case, metric, ours, base_name, base,
                          higher_is_better=higher_is_better, target=target)

    hf4, hf16, px = "HF transformers + PEFT + bitsandbytes NF4", "HF transformers + PEFT bf16", \
        "plain-XLA JAX bf16 step (hand-written, cuDNN)"
    dense = "ours, dense-weight residuals (autodiff of dequantize-then-dot)"
    out = [
        row("fast: NF4, no remat", "tokens/s", get("ours_fast", "tokens_per_s"), hf4,
            get("hf_nf4", "tokens_per_s"), True, TARGET["e2e tokens/s vs HF"]),
        row("fast: NF4, no remat", "tokens/s", get("ours_fast", "tokens_per_s"), px,
            get("plain_xla", "tokens_per_s"), True, TARGET["e2e tokens/s vs plain XLA"]),
        row("fast: NF4, no remat", "tokens/s", get("ours_fast", "tokens_per_s"), dense,
            get("ours_fast_dense", "tokens_per_s"), True, None),
        row("fast: NF4, no remat", "peak HBM (GiB)", _gib(get("ours_fast", "peak_bytes")), dense,
            _gib(get("ours_fast_dense", "peak_bytes")), False, None),
        row("lean: NF4, offload remat, chunked loss", "tokens/s",
            get("ours_lean", "tokens_per_s"), hf4, get("hf_nf4", "tokens_per_s"), True, None),
        row("NF4, dots-saveable remat", "tokens/s", get("ours_dots", "tokens_per_s"), px,
            get("plain_xla", "tokens_per_s"), True, None),
        row("NF4, dots-saveable remat", "peak HBM (GiB)", _gib(get("ours_dots", "peak_bytes")),
            hf4, _gib(get("hf_nf4", "peak_bytes")), False, None),
        row("fast: NF4, no remat", "peak HBM (GiB)", _gib(get("ours_fast", "peak_bytes")), hf4,
            _gib(get("hf_nf4", "peak_bytes")), False, None),
        row("lean: NF4, offload remat, chunked loss", "peak HBM (GiB)",
            _gib(get("ours_lean", "peak_bytes")), hf4, _gib(get("hf_nf4", "peak_bytes")), False,
            TARGET["e2e lean memory vs HF"]),
        row("bf16 LoRA, no remat", "tokens/s", get("ours_bf16", "tokens_per_s"), hf16,
            get("hf_bf16", "tokens_per_s"), True, None),
        row("bf16 LoRA, no remat", "peak HBM (GiB)", _gib(get("ours_bf16", "peak_bytes")), hf16,
            _gib(get("hf_bf16", "peak_bytes")), False, None),
        row("plain-XLA bf16 (calibration)", "tokens/s", get("plain_xla", "tokens_per_s"), hf16,
            get("hf_bf16", "tokens_per_s"), True, None),
        row("fast: NF4, no remat", "first-step compile (s)", get("ours_fast", "compile_s"), px,
            get("plain_xla", "compile_s"), False, f"<= {TARGET['e2e compile s']:.0f} s"),
    ]
    for part, base in (("ours_fast", "hf_nf4"), ("ours_bf16", "hf_bf16")):
        lp = raw.get(part, {}).get("lora_params")
        if lp and get(part, "tokens_per_s") and get(base, "tokens_per_s"):
            f = flops_per_token(cfg, seq, lp)
            out.append(row(f"{part}: useful MFU", "MFU (fraction of 766 TF/s)",
                           f * get(part, "tokens_per_s") / PEAK_FLOPS,
                           hf4 if base == "hf_nf4" else hf16,
                           f * get(base, "tokens_per_s") / PEAK_FLOPS, True,
                           TARGET["e2e MFU"] if part == "ours_fast" else None))
    ctx_ours = raw.get("ctx_ours", {}).get("max_fits")
    ctx_hf = raw.get("ctx_hf", {}).get("max_fits")
    out.append(row("max context, batch 1 (lean vs HF NF4 + grad. checkpointing)",
                   "tokens", ctx_ours, hf4, ctx_hf, True,
                   f">= {TARGET['e2e max context tokens']} tokens"))
    return out


def _gib(value: float | None) -> float | None:
    return value / GIB if value else None


def plot(raw: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("ours_fast", "ours fast\n(NF4)"), ("ours_lean", "ours lean\n(NF4)"),
             ("ours_dots", "ours NF4\ndots remat"),
             ("hf_nf4", "HF+PEFT\n+bnb NF4"), ("ours_bf16", "ours\nbf16"),
             ("plain_xla", "plain XLA\nbf16"), ("hf_bf16", "HF+PEFT\nbf16")]
    present = [(k, label) for k, label in names if raw.get(k, {}).get("tokens_per_s")]
    colors = ["#1f77b4" if k.startswith("ours") else "#7f7f7f" if k == "plain_xla"
              else "#d62728" for k, _ in present]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, scale, label in ((axes[0], "tokens_per_s", 1.0, "tokens/s (higher is better)"),
                                  (axes[1], "peak_bytes", 1 / GIB,
                                   "peak HBM, GiB (lower is better)")):
        values = [raw[k][key] * scale for k, _ in present]
        bars = ax.bar([lbl for _, lbl in present], values, color=colors)
        ax.bar_label(bars, fmt="%.0f" if key == "tokens_per_s" else "%.1f")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(raw: dict, out: pathlib.Path, args: argparse.Namespace) -> None:
    cfg = common.TINY_LLAMA if args.tiny else common.LLAMA3_8B
    device = next((r.get("device") for r in raw.values() if r.get("device")), "unknown")
    jax_versions = next((r["versions"] for r in raw.values() if "jax" in r.get("versions", {})),
                        {})
    hf = raw.get("hf_nf4", {})
    result = common.envelope(
        "train_e2e", device=device, versions={**jax_versions, **hf.get("versions", {})},
        commit=args.commit,
        setup=f"Llama-3-8B shapes, random weights; LoRA r16 a16 on 7 projections; seq "
              f"{args.seq}, micro-batch {args.micro_batch} x accumulation {args.accumulation}; "
              f"median of {args.steps} steps after {args.warmup}",
        mfu_formula="(4 N_frozen + 6 N_lora + 3.5*4*head_dim*heads*layers*(seq+1)/2) "
                    "* tokens/s / 766e12")
    result["rows"] = rows(raw, cfg, args.seq)
    if raw.get("profile", {}).get("parts_s") and raw.get("ours_fast", {}).get("step_s"):
        parts = dict(raw["profile"]["parts_s"])
        step = raw["ours_fast"]["step_s"]
        parts["other (optimizer, scan, copies, gaps)"] = step - sum(parts.values())
        result["profile_fast_step_s"] = {"step_s": step, "parts_s": parts}
    common.write(result, out)
    date = result["date"]
    print("\n" + common.markdown_table(result["rows"]))
    if "profile_fast_step_s" in result:
        p = result["profile_fast_step_s"]
        print(f"\nfast step {p['step_s']:.3f} s:")
        for k, v in p["parts_s"].items():
            print(f"  {k:48s} {v:8.3f} s  {100 * v / p['step_s']:5.1f}%")
    if any(raw.get(k, {}).get("tokens_per_s") for k in ALL_PARTS):
        try:
            plot(raw, out / f"train_e2e-{date}.png",
                 f"Llama-3-8B LoRA r16, 16K tokens/step, {device}, {date}")
        except ImportError:
            print("matplotlib is missing: no chart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--parts", default=",".join(ALL_PARTS))
    parser.add_argument("--merge", nargs="*", type=pathlib.Path, default=None)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hf-python", default=sys.executable)
    parser.add_argument("--hf-context-budget-s", type=float, default=200.0)
    parser.add_argument("--part-timeout-s", type=float, default=560.0)
    parser.add_argument("--commit", default="")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "train_e2e-raw.json"
    if args.merge is not None:
        raw: dict = {}
        for path in args.merge:
            raw.update({k: v for k, v in json.loads(path.read_text()).items() if "error" not in v
                        or k not in raw})
        raw_path.write_text(json.dumps(raw, indent=1))
    else:
        unknown = set(args.parts.split(",")) - set(ALL_PARTS)
        if unknown:
            parser.error(f"--parts: unknown {sorted(unknown)}; choose from {list(ALL_PARTS)}")
        raw = run_parts(args, raw_path)
    report(raw, args.out, args)


if __name__ == "__main__":
    main()
