"""GRPO step (rollout + policy update): fastlora_jax's GRPOTrainer vs TRL's GRPOTrainer + PEFT,
and on the CPU also vs Tunix's GRPOLearner (the JAX peer).

All trainers run in this run, each in its own process (a clean peak-memory count), on the same
shapes: each optimizer step samples --generations completions of each of --prompts prompts
(temperature 1, no top-k, up to --completion tokens), scores them with the same reward
(`grpo_trl.reward_even`, read from the completion ids) and takes one optimizer step over them
(dapo loss, beta 0, micro-batches of --micro_batch completions, LoRA r=16 alpha=16 on all seven
projections, learning rate 1e-5). Reported: median step time after --warmup steps, samples
(completions) per second, the rollout / update split, peak memory, and the mean completion
length of each side (sampling makes it differ a little: the step's work follows it).

Presets:
  smollm2    (CPU) SmolLM2-135M-Instruct float32 from the checkpoint, its chat template; TRL runs
             in the reference environment (torch CPU), Tunix's GRPOLearner (qwix LoRA, its
             vanilla sampler) in .benchenv/tunix (benchmarks/tunix_env.sh; grpo_tunix.py says
             how its run matches the others).
  llama3-8b  (GPU) Llama-3-8B's shapes, random bf16 weights created on the device, NF4 frozen
             projections (--quant nf4: ours `quantize_nf4_on_device`, TRL's side bitsandbytes
             Linear4bit as benchmarks/e2e_hf.py builds it), gradient checkpointing on both
             sides, prompts of --prompt_len random tokens of a synthetic word-level tokenizer.
             TRL runs in this machine's Python when `trl`, `datasets` (and for NF4
             `bitsandbytes`) import there; otherwise only our side is measured and the result
             says what was missing.
  tiny       the llama3-8b path on a tiny random Llama (the CPU smoke test of the GPU path;
             Tunix's side runs it too, as its driver's smoke test).

Usage: .venv/bin/python benchmarks/grpo.py [--preset smollm2] [--prompts 4 --generations 4
       --completion 32] [--no-trl] [--no-tunix] [--out DIR --commit SHA --tag NAME]
Writes benchmarks/results/grpo-<date>[-tag].json (rows as benchmarks/common.py lays them out)
with the load average before and after; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
import grpo_trl

REFENV_PYTHON = common.REPO / ".refenv" / "bin" / "python"
TUNIX_PYTHON = common.REPO / ".benchenv" / "tunix" / "bin" / "python"
SCRIPTS = {"ours": "grpo.py", "trl": "grpo_trl.py", "tunix": "grpo_tunix.py"}
PRESETS = {"smollm2": None, "llama3-8b": common.LLAMA3_8B, "tiny": common.TINY_LLAMA}
DEFAULTS = {  # prompts, generations, completion, prompt_len, micro_batch, warmup, steps
    "smollm2": dict(prompts=4, generations=4, completion=32, prompt_len=0, micro_batch=16,
                    warmup=2, steps=4),
    # one timed step after the compiling one keeps the GPU stage (both sides) within 5 minutes
    "llama3-8b": dict(prompts=8, generations=8, completion=256, prompt_len=64, micro_batch=16,
                      warmup=1, steps=1),
    "tiny": dict(prompts=2, generations=4, completion=8, prompt_len=8, micro_batch=4, warmup=1,
                 steps=2),
}


# ---- our side (in its own process: `grpo.py --side ours JSON`) ---------------------------------
def run_ours(a: dict) -> dict:
    import jax

    from fastlora_jax import FastLanguageModel, GRPOConfig, GRPOTrainer
    from fastlora_jax.models.causal_lm import CausalLM
    from fastlora_jax.models.registry import config_from_hf

    t0 = time.perf_counter()
    if a["preset"] == "smollm2":
        model, tok = FastLanguageModel.from_pretrained(a["model"], dtype="float32")
        prompts = grpo_trl.chat_prompts(a["prompts"])
    else:
        import e2e_jax  # a sibling: random weights (NF4 projections) made on the device

        config = config_from_hf(a["config"])
        model = CausalLM(config, e2e_jax.make_frozen(config, a["quant"]),
                         max_seq_length=a["prompt_len"] + a["completion"])
        tok = grpo_trl.synthetic_tokenizer(config.vocab_size)
        prompts = grpo_trl.token_prompts(a["prompts"], a["prompt_len"], config.vocab_size)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    setup_s = time.perf_counter() - t0
    n = a["prompts"] * a["generations"]
    total = a["warmup"] + a["steps"]
    args = GRPOConfig(output_dir=a["out"], per_device_train_batch_size=a["micro_batch"],
                      gradient_accumulation_steps=n // a["micro_batch"],
                      num_generations=a["generations"], max_completion_length=a["completion"],
                      temperature=1.0, top_k=0, max_steps=total, learning_rate=1e-5, beta=0.0,
                      loss_type="dapo", report_to="none", logging_steps=1, disable_tqdm=True,
                      log_completions=False, use_gradient_checkpointing=a["remat"], save_steps=0)
    data = [{"prompt": p} for p in prompts * total]  # rows in memory: no `datasets` needed
    GRPOTrainer(model, grpo_trl.reward_even, args=args, train_dataset=data,
                processing_class=tok).train()
    records = [json.loads(x) for x in (pathlib.Path(a["out"]) / "log.jsonl").read_text()
               .splitlines()]
    # A record's time is when its step ended; the first step (compilation) has no start here.
    times = [b["time"] - r["time"] for r, b in zip(records, records[1:])][a["warmup"] - 1:]
    kept = records[a["warmup"]:]
    stats = jax.devices()[0].memory_stats() or {}
    step = statistics.median(times)
    rollout = statistics.median(r["time/rollout"] for r in kept)
    return {"step_s": step, "rollout_s": rollout, "update_s": step - rollout,
            "update_call_s": statistics.median(r["time/update"] for r in kept),
            "mean_length": statistics.mean(r["completions/mean_length"] for r in kept),
            "setup_s": setup_s,
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


# ---- the driver ----------------------------------------------------------------------------------
def side(python: str, which: str, a: dict, timeout: float) -> tuple[dict | None, str]:
    """Run one side in its own process: (its JSON, '') or (None, why not)."""
    script = pathlib.Path(__file__).with_name(SCRIPTS[which])
    cmd = [python, str(script)] + (["--side", "ours"] if which == "ours" else []) + [json.dumps(a)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1),
                              env=env)
    except subprocess.TimeoutExpired:
        return None, f"{which} side did not finish within {timeout:.0f}s"
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        return None, f"{which} side failed (exit {proc.returncode}); its log is above"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def trl_python(args: argparse.Namespace) -> tuple[str, str]:
    """The Python that runs TRL, or ('', what is missing)."""
    python = str(REFENV_PYTHON) if args.device == "cpu" else sys.executable
    needs = ["trl", "datasets", "peft"] + (["bitsandbytes"] if args.quant == "nf4" else [])
    check = (f"import importlib.util, sys; m = [n for n in {needs!r} "
             f"if importlib.util.find_spec(n) is None]; print(','.join(m))")
    try:
        missing = subprocess.run([python, "-c", check], capture_output=True, text=True,
                                 timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"no Python for TRL ({e})"
    return (python, "") if not missing else ("", f"TRL side needs {missing} in {python}")


def tunix_python(args: argparse.Namespace) -> tuple[str, str]:
    """The Python that runs Tunix's learner, or ('', why not)."""
    if args.device != "cpu":
        return "", "Tunix's learner runs on the CPU presets only (its environment is not there)"
    if not TUNIX_PYTHON.exists():
        return "", f"no {TUNIX_PYTHON} (make it with benchmarks/tunix_env.sh)"
    return str(TUNIX_PYTHON), ""


def gib(x: float | None) -> float | None:
    return None if x is None else x / 2**30


def rows(ours: dict, theirs: dict | None, n: int, case: str, base: str, gpu: bool,
         target: float | None = 3.0) -> list[dict]:
    """Our numbers over one baseline's (`theirs` None: the baseline cells stay empty); `target`
    is the samples/s ratio the issue asks for against this baseline."""
    t = theirs or {}
    mem_key = "peak_bytes" if gpu else "peak_rss_bytes"
    mem = "peak HBM (GiB)" if gpu else "peak RSS (GiB)"
    return [
        common.row(case, "samples/s", n / ours["step_s"], base,
                   n / t["step_s"] if t else None, target=target),
        common.row(case, "median step s", ours["step_s"], base, t.get("step_s"),
                   higher_is_better=False),
        common.row(case, "rollout s", ours["rollout_s"], base, t.get("rollout_s"),
                   higher_is_better=False),
        common.row(case, "update s (step - rollout)", ours["update_s"], base, t.get("update_s"),
                   higher_is_better=False),
        common.row(case, mem, gib(ours[mem_key]), base, gib(t.get(mem_key)),
                   higher_is_better=False, target=2.0 if gpu else None),
        common.row(case, "mean completion tokens", ours["mean_length"], base,
                   t.get("mean_length"), target="(equal work)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="smollm2")
    parser.add_argument("--model", default=str(common.REPO / ".cache" / "models" /
                                               "SmolLM2-135M-Instruct"))
    for key in DEFAULTS["smollm2"]:
        parser.add_argument(f"--{key}", type=int, default=None,
                            help="default: the preset's (see DEFAULTS)")
    parser.add_argument("--quant", choices=("nf4", "bf16"), default=None,
                        help="random presets' frozen weights (default nf4)")
    parser.add_argument("--remat", choices=("on", "off"), default=None,
                        help="gradient checkpointing on both sides (default: on for the GPU)")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's side out")
    parser.add_argument("--no-tunix", action="store_true",
                        help="leave Tunix's side out (it runs on the CPU presets only)")
    parser.add_argument("--budget_s", type=float, default=3600.0,
                        help="wall-clock budget of the whole run; each baseline gets what is left")
    parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS)
    parser.add_argument("--commit", default="")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    start = time.perf_counter()
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = "cuda" if args.preset == "llama3-8b" else "cpu"
    if args.preset == "smollm2":
        args.quant = "float32"
    elif args.quant is None:
        args.quant = "nf4"
    n = args.prompts * args.generations
    if n % args.micro_batch:
        parser.error(f"--micro_batch {args.micro_batch} must divide prompts x generations = {n}")
    load_before = pathlib.Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        shared = dict(preset=args.preset, model=args.model, config=PRESETS[args.preset],
                      quant=args.quant, device=args.device,
                      remat=args.remat == "on" if args.remat else args.device == "cuda",
                      targets=list(common.LORA_TARGETS),
                      **{k: getattr(args, k) for k in DEFAULTS["smollm2"]})
        ours, why = side(sys.executable, "ours", dict(shared, out=f"{tmp}/ours"),
                         args.budget_s)
        if ours is None:
            raise SystemExit(why)
        done = {}  # baseline -> (its JSON or None, why not)
        for which, skip, find in (("trl", args.no_trl, trl_python),
                                  ("tunix", args.no_tunix, tunix_python)):
            python, why = ("", f"not run (--no-{which})") if skip else find(args)
            done[which] = (side(python, which, dict(shared, out=f"{tmp}/{which}"),
                                args.budget_s - (time.perf_counter() - start))
                           if python else (None, why))
    (theirs, note), (tunix, tunix_note) = done["trl"], done["tunix"]
    load_after = pathlib.Path("/proc/loadavg").read_text().split()[:3]
    model = "SmolLM2-135M fp32" if args.preset == "smollm2" else \
        f"{args.preset} {args.quant} random weights"
    case = (f"{model}, LoRA r16, {args.prompts} prompts x {args.generations} gens, <= "
            f"{args.completion} tokens, micro-batch {args.micro_batch}")
    base = "TRL GRPOTrainer + PEFT" + (" + bitsandbytes" if args.quant == "nf4" else "") + \
        (" (torch CPU)" if args.device == "cpu" else "")
    versions = {"jax": ours["jax"]}
    for other in (theirs, tunix):
        versions.update(other["versions"] if other else {})
    doc = common.envelope("grpo", device=ours["device"], versions=versions, commit=args.commit,
                          load_before=" ".join(load_before), load_after=" ".join(load_after),
                          ours=ours, trl=theirs, trl_note=note, tunix=tunix,
                          tunix_note=tunix_note,
                          torch_threads=theirs["threads"] if theirs else None)
    doc["rows"] = rows(ours, theirs, n, case, base, args.device == "cuda")
    if args.device == "cpu":
        doc["rows"] += rows(ours, tunix, n, case, "Tunix GRPOLearner + qwix LoRA (jax CPU, fp32)",
                            gpu=False, target=None)
    path = common.write(doc, args.out, args.tag)
    print(common.markdown_table(doc["rows"]))
    print(f"load before {' '.join(load_before)}, after {' '.join(load_after)}"
          + (f"; TRL: {note}" if note else "") + (f"; Tunix: {tunix_note}" if tunix_note else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--side"]:
        print(json.dumps(run_ours(json.loads(sys.argv[3]))))
    else:
        main()
