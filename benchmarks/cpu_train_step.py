"""CPU LoRA training step: fastlora_jax vs HF transformers + PEFT on torch, same model and batch.

SmolLM2-135M-Instruct (float32), LoRA r=16 alpha=16 on all seven projections, one micro-batch of
[batch, seq] tokens, AdamW, no gradient checkpointing on either side. Median step time over
--steps steps after --warmup steps, both measured in this run (torch in the reference env, as a
subprocess).
Usage: .venv/bin/python benchmarks/cpu_train_step.py [--batch 4 --seq 256] [--trace DIR]
       [--label LABEL]
The result records the load average (1, 5, 15 min) at the end of the run: on a shared machine the
two sides' times move with it, and not by the same factor. --before also times our step with the
CPU defaults that preceded the dense attention and the in-forward loss gradient
(PREVIOUS_CPU_DEFAULTS), one step of each in turn in the same process, so the load blurs both
alike: that row measures what those defaults bought.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
import step_trace
from fastlora_jax import FastLanguageModel
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step

REPO = common.REPO
TRACED_STEPS = 2
# StepConfig fields that give our step the CPU defaults before kernels/attention_dense.py and the
# loss's in-forward gradient (train/loss.py).
PREVIOUS_CPU_DEFAULTS = {"attention_impl": "reference", "loss_grad_in_forward": False}

TORCH_STEP = """
import time, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
model = AutoModelForCausalLM.from_pretrained(ARGS["model"], dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=ARGS["targets"],
                                         task_type="CAUSAL_LM"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.tensor(INPUTS["ids"])
times = []
for i in range(ARGS["warmup"] + ARGS["steps"]):
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
OUTPUTS["times"] = np.array(times[ARGS["warmup"]:])
OUTPUTS["threads"] = np.array(torch.get_num_threads())
"""


def ours(model_dir: pathlib.Path, ids: np.ndarray, warmup: int, steps: int,
         trace: pathlib.Path | None = None, before: bool = False
         ) -> tuple[list[float], dict | None, list[float] | None]:
    """Our step's seconds per step; with `trace`, two more steps under jax.profiler.trace into
    that folder and their step_trace summary; with `before`, the seconds per step of the step
    with PREVIOUS_CPU_DEFAULTS, timed in turn with ours."""
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16)
    opt = make_optimizer(learning_rate=1e-4, warmup_steps=0, total_steps=1000, max_grad_norm=None)
    frozen = model.params()
    b, t = ids.shape
    targets = np.concatenate([ids[:, 1:], np.full((b, 1), -100)], axis=1)
    batch = {"input_ids": jnp.asarray(ids[None], jnp.int32),
             "targets": jnp.asarray(targets[None], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
             "segment_ids": jnp.ones((1, b, t), jnp.int32)}
    runs = {}  # name -> [compiled step, lora, optimizer state, seconds per step]
    for name, overrides in [("ours", {})] + ([("before", PREVIOUS_CPU_DEFAULTS)] if before else []):
        cfg = StepConfig(model=model.config, lora=model.lora_spec, remat=False, **overrides)
        lora = jax.tree.map(jnp.copy, model.lora_params())
        state = opt.init(lora)
        compiled = train_step.lower(lora, state, frozen, batch, cfg=cfg, optimizer=opt).compile()
        runs[name] = [compiled, lora, state, []]
    for _ in range(warmup + steps):
        for run in runs.values():
            compiled, lora, state, times = run
            start = time.perf_counter()
            lora, state, metrics = compiled(lora, state, frozen, batch)
            metrics["loss"].block_until_ready()
            times.append(time.perf_counter() - start)
            run[1:3] = lora, state
    compiled, lora, state, times = runs["ours"]
    summary = None
    if trace is not None:  # after the timed steps: the profiler's overhead stays out of them
        with jax.profiler.trace(str(trace)):
            for _ in range(TRACED_STEPS):
                lora, state, metrics = compiled(lora, state, frozen, batch)
                metrics["loss"].block_until_ready()
        hlo = compiled.as_text()
        (pathlib.Path(trace) / "module.hlo.txt").write_text(hlo)
        summary = step_trace.summarize(pathlib.Path(trace), hlo, TRACED_STEPS,
                                       module="jit_train_step")
        print(step_trace.format_summary(summary))
    return times[warmup:], summary, runs["before"][3][warmup:] if before else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=pathlib.Path,
                        default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trace", type=pathlib.Path, default=None,
                        help="also trace two of our steps into this folder (step_trace.py)")
    parser.add_argument("--before", action="store_true",
                        help="also time our step with PREVIOUS_CPU_DEFAULTS, in turn with ours")
    parser.add_argument("--label", default="",
                        help="suffix of the result file (cpu_train_step-<date>-<label>.json)")
    args = parser.parse_args()
    ids = np.random.default_rng(0).integers(0, 49152, size=(args.batch, args.seq)).astype(np.int64)
    ours_times, summary, before_times = ours(args.model, ids, args.warmup, args.steps, args.trace,
                                             args.before)
    ours_t = statistics.median(ours_times)
    ref = run_reference(TORCH_STEP, {"ids": ids}, model=str(args.model),
                        targets=list(common.LORA_TARGETS),
                        warmup=args.warmup, steps=args.steps)
    theirs_t = float(np.median(ref["times"]))
    tokens = args.batch * args.seq
    case = f"SmolLM2-135M fp32 LoRA r16 all-proj, batch {args.batch}x{args.seq}"
    extra = []
    if before_times:
        extra.append(common.row(
            case, "median step time (s), same process, alternating", ours_t,
            f"fastlora_jax with {PREVIOUS_CPU_DEFAULTS}", statistics.median(before_times),
            higher_is_better=False))
    common.write_cpu_step_vs_torch("cpu_train_step", case, ours_t, theirs_t, tokens,
                                   int(ref["threads"]), tag=args.label, extra_rows=extra,
                                   step_trace=summary)


if __name__ == "__main__":
    main()
