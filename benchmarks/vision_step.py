"""CPU LoRA training step of a small LLaVA: fastlora_jax vs transformers + PEFT on torch, the same
checkpoint, batch and adapters, both measured in this run.

The checkpoint (CLIP tower + Llama text model with SmolLM2's vocabulary, random weights, float32)
is written by transformers in the reference environment; both sides read it and its processor.
LoRA r=16 alpha=16 on the attention and MLP projections of the vision and language layers
(Unsloth's default targets: the same regex on both sides), AdamW, no gradient checkpointing.
Each row holds one image (the processor's pixels, the same arrays on both sides) and a short
chat; labels are the whole row. Median step time over --steps steps after --warmup.
Usage: .venv/bin/python benchmarks/vision_step.py [--batch 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.testing.vision import build_llava, images
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step
from fastlora_jax import FastVisionModel

# A small LLaVA: big enough that the step is compute, not dispatch.
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4)
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              image_size=56, patch_size=14)

TORCH_STEP = """
import time, torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(ARGS["model"], dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=ARGS["targets"],
                                         task_type="CAUSAL_LM"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
OUTPUTS["lora_params"] = np.array(sum(p.numel() for p in params))
opt = torch.optim.AdamW(params, lr=1e-4)
inputs = {k: torch.from_numpy(v) for k, v in INPUTS.items()}
times = []
for i in range(ARGS["warmup"] + ARGS["steps"]):
    t = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
OUTPUTS["times"] = np.array(times[ARGS["warmup"]:])
OUTPUTS["threads"] = np.array(torch.get_num_threads())
"""


def make_inputs(processor, batch: int) -> dict[str, np.ndarray]:
    """Processor outputs for `batch` rows of one image and a short chat each (equal lengths)."""
    texts, pictures = [], images(tuple((30 + 7 * i, 24 + 5 * i) for i in range(batch)))
    for i in range(batch):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Name the colours."}]},
                    {"role": "assistant", "content": [{"type": "text",
                                                       "text": f"Colour number {i}."}]}]
        texts.append(processor.apply_chat_template(messages))
    out = processor(text=texts, images=pictures, return_tensors="np", padding=True)
    if not np.asarray(out["attention_mask"]).all():
        raise SystemExit("the benchmark's rows must have equal lengths (no padding)")
    return {k: np.asarray(out[k]) for k in ("input_ids", "attention_mask", "pixel_values")}


def ours(model_dir: pathlib.Path, inputs: dict[str, np.ndarray], warmup: int,
         steps: int) -> tuple[list[float], str, int]:
    """(our seconds per step, the LoRA target regex, trainable parameter count)."""
    model, _ = FastVisionModel.from_pretrained(model_dir, dtype="float32")
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    cfg = StepConfig(model=model.config.text, lora=model.lora_spec, remat=False,
                     vision=(model.arch, model.config))
    opt = make_optimizer(learning_rate=1e-4, warmup_steps=0, total_steps=1000, max_grad_norm=None)
    lora = jax.tree.map(jnp.copy, model.lora_params())
    state = opt.init(lora)
    ids = inputs["input_ids"].astype(np.int32)
    b, t = ids.shape
    # transformers' labels=input_ids: each position predicts the next token
    targets = np.concatenate([ids[:, 1:], np.full((b, 1), IGNORE)], axis=1)
    batch = {"input_ids": jnp.asarray(ids[None]), "targets": jnp.asarray(targets[None], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, b, t)),
             "pixel_values": jnp.asarray(inputs["pixel_values"][None, :, None])}
    compiled = train_step.lower(lora, state, model.frozen, batch, cfg=cfg,
                                optimizer=opt).compile()
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        lora, state, metrics = compiled(lora, state, model.frozen, batch)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(lora))
    return times[warmup:], model.lora_spec.config.target_modules, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_llava(pathlib.Path(tmp) / "llava", text=TEXT, vision=VISION)
        _, processor = FastVisionModel.from_pretrained(folder, dtype="float32")
        inputs = make_inputs(processor, args.batch)
        ours_times, targets, ours_params = ours(folder, inputs, args.warmup, args.steps)
        hf_inputs = dict(inputs, labels=inputs["input_ids"])
        ref = run_reference(TORCH_STEP, hf_inputs, model=str(folder), targets=targets,
                            warmup=args.warmup, steps=args.steps)
    if int(ref["lora_params"]) != ours_params:
        raise SystemExit(f"the two sides train different adapters: ours {ours_params} "
                         f"parameters, PEFT's {int(ref['lora_params'])}")
    ours_t, theirs_t = statistics.median(ours_times), float(np.median(ref["times"]))
    tokens = int(inputs["attention_mask"].sum())
    case = (f"tiny LLaVA fp32 (CLIP 4x128, Llama 4x256), LoRA r16 vision+language, "
            f"batch {args.batch} x {inputs['input_ids'].shape[1]} tokens, 1 image/row")
    common.write_cpu_step_vs_torch("vision_step", case, ours_t, theirs_t, tokens,
                                   int(ref["threads"]))


if __name__ == "__main__":
    main()
