"""GRPO step (rollout + policy update): fastlora_jax vs TRL's GRPOTrainer + PEFT, same run.

CPU: SmolLM2-135M-Instruct float32, LoRA r=16 alpha=16 on all seven projections; each step
samples --generations completions of each of --prompts chat prompts (temperature 1, up to
--completion tokens), scores them with the same reward function, and takes one optimizer step
(dapo loss, beta 0, one micro-batch). TRL runs in the reference environment (torch CPU,
transformers generate with its KV cache, bf16 off). Reported: median wall time per step after
--warmup steps, samples (completions) per second, our rollout / update split, and the mean
completion length on each side (sampling makes it differ a little).
Usage: .venv/bin/python benchmarks/grpo.py [--prompts 4 --generations 4 --completion 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

import jax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastlora_jax import FastLanguageModel, GRPOConfig, GRPOTrainer  # noqa: E402
from fastlora_jax.testing.refenv import run_reference  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short sentence about the number {i + 7}."}]
            for i in range(n)]


def reward_len(completions, **_):
    """Prefer answers near 20 characters (any cheap verifiable reward does)."""
    return [-abs(len(c[0]["content"]) - 20) / 20 for c in completions]


TRL_RUN = """
import time, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

def reward_len(completions, **_):
    return [-abs(len(c[0]["content"]) - 20) / 20 for c in completions]

class Timer(TrainerCallback):
    times, lengths = [], []
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)

tok = AutoTokenizer.from_pretrained(ARGS["model"])
model = AutoModelForCausalLM.from_pretrained(ARGS["model"], dtype=torch.float32)
n = ARGS["prompts"] * ARGS["generations"]
args = GRPOConfig(output_dir=ARGS["out"], per_device_train_batch_size=n,
                  gradient_accumulation_steps=1, num_generations=ARGS["generations"],
                  max_completion_length=ARGS["completion"], temperature=1.0, top_k=0,
                  max_steps=ARGS["warmup"] + ARGS["steps"], learning_rate=1e-5, beta=0.0,
                  loss_type="dapo", bf16=False, use_cpu=True, report_to="none", logging_steps=1,
                  save_strategy="no", disable_tqdm=True)
data = Dataset.from_dict({"prompt": ARGS["prompt_list"] * (ARGS["warmup"] + ARGS["steps"])})
trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=data,
                      processing_class=tok,
                      peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=ARGS["targets"],
                                             task_type="CAUSAL_LM"),
                      callbacks=[Timer()])
trainer.train()
OUTPUTS["times"] = np.array(Timer.times[ARGS["warmup"]:])
lengths = [h["completions/mean_length"] for h in trainer.state.log_history
           if "completions/mean_length" in h]
OUTPUTS["mean_length"] = np.array(np.mean(lengths[ARGS["warmup"]:]))
OUTPUTS["threads"] = np.array(torch.get_num_threads())
"""


def ours(args: argparse.Namespace, out: pathlib.Path) -> dict[str, float]:
    from datasets import Dataset

    model, tok = FastLanguageModel.from_pretrained(args.model, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    n = args.prompts * args.generations
    total = args.warmup + args.steps
    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=n,
                        gradient_accumulation_steps=1, num_generations=args.generations,
                        max_completion_length=args.completion, temperature=1.0, top_k=0,
                        max_steps=total, learning_rate=1e-5, beta=0.0, loss_type="dapo",
                        report_to="none", logging_steps=1, disable_tqdm=True,
                        log_completions=False, use_gradient_checkpointing=False)
    data = Dataset.from_dict({"prompt": prompts(args.prompts) * total})
    GRPOTrainer(model, reward_len, args=config, train_dataset=data, processing_class=tok).train()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(records, records[1:])][args.warmup - 1:]
    kept = records[args.warmup:]
    return {"step": statistics.median(times),
            "rollout": statistics.median(r["time/rollout"] for r in kept),
            "update": statistics.median(r["time/update"] for r in kept),
            "mean_length": statistics.mean(r["completions/mean_length"] for r in kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=pathlib.Path,
                        default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    load = pathlib.Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        mine = ours(args, pathlib.Path(tmp) / "ours")
        ref = run_reference(TRL_RUN, {}, model=str(args.model), out=str(pathlib.Path(tmp) / "trl"),
                            prompts=args.prompts, generations=args.generations,
                            completion=args.completion, warmup=args.warmup, steps=args.steps,
                            targets=TARGETS, prompt_list=prompts(args.prompts), timeout=3600)
    theirs = float(statistics.median(ref["times"].tolist()))
    n = args.prompts * args.generations
    case = (f"SmolLM2-135M fp32 LoRA r16, {args.prompts} prompts x {args.generations} gens, "
            f"<= {args.completion} tokens (mean length ours {mine['mean_length']:.1f}, TRL "
            f"{float(ref['mean_length']):.1f}); load {' '.join(load)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    base = "TRL GRPOTrainer + PEFT (torch CPU)"
    rows = [{"case": case, "metric": "median step time (s)", "ours": mine["step"],
             "baseline_name": base, "baseline": theirs, "ratio": theirs / mine["step"],
             "target": 3.0},
            {"case": case, "metric": "samples/s", "ours": n / mine["step"], "baseline_name": base,
             "baseline": n / theirs, "ratio": theirs / mine["step"], "target": 3.0},
            {"case": case, "metric": "ours: rollout s / update s", "ours": mine["rollout"],
             "baseline_name": "ours update", "baseline": mine["update"],
             "ratio": mine["update"] / mine["rollout"], "target": None}]
    result = {"benchmark": "grpo", "date": datetime.date.today().isoformat(),
              "device": f"CPU {platform.processor() or platform.machine()}, "
                        f"{jax.device_count()} JAX device(s), torch threads {int(ref['threads'])}",
              "jax_version": jax.__version__, "commit": commit, "rows": rows}
    out = REPO / "benchmarks" / "results" / f"grpo-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2))
    print("\n| case | metric | ours | TRL | ratio (higher = ours better) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['metric']} | {row['ours']:.3f} | {row['baseline']:.3f} | "
              f"{row['ratio']:.2f}x |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
