"""Training fidelity: 30 LoRA steps on SmolLM2-135M match HF transformers + PEFT + torch AdamW."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.testing.refenv import run_reference
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step

pytestmark = [pytest.mark.reference, pytest.mark.slow]

STEPS, B, T = 30, 2, 32
HP = dict(learning_rate=5e-4, warmup_steps=3, weight_decay=0.01, max_grad_norm=1.0)

TORCH_LOOP = """
import torch
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
from peft import PeftModel
torch.manual_seed(0)
hp = ARGS["hp"]
model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
model = PeftModel.from_pretrained(model, ARGS["adapter"], is_trainable=True)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=hp["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=hp["weight_decay"])
sched = get_linear_schedule_with_warmup(opt, hp["warmup_steps"], ARGS["steps"])
losses = []
for step in range(ARGS["steps"]):
    ids = torch.tensor(INPUTS["ids"][step])
    labels = torch.tensor(INPUTS["labels"][step])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
    opt.step(); sched.step(); opt.zero_grad()
    losses.append(loss.item())
OUTPUTS["losses"] = np.array(losses)
"""


def test_thirty_steps_match_hf_peft(smollm2_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    model.save_pretrained(tmp_path / "init")  # both sides start from these exact weights
    text = open(smollm2_dir / "tokenizer.json").read()[:200_000]
    stream = np.asarray(tokenizer(text)["input_ids"][: STEPS * B * T], np.int64)
    ids = stream.reshape(STEPS, B, T)
    labels = ids.copy()
    labels[:, :, :4] = IGNORE  # a masked prefix, as with prompts
    ref = run_reference(TORCH_LOOP, {"ids": ids, "labels": labels}, base=str(smollm2_dir),
                        adapter=str(tmp_path / "init"), steps=STEPS, hp=HP)["losses"]

    targets = np.concatenate([labels[:, :, 1:], np.full((STEPS, B, 1), IGNORE)], axis=-1)
    opt = make_optimizer(total_steps=STEPS, **HP)
    cfg = StepConfig(model=model.config, lora=model.lora_spec, remat=False)
    lora = jax.tree.map(jnp.copy, model.lora_params())
    state = opt.init(lora)
    frozen = model.params()
    ours = []
    for step in range(STEPS):
        batch = {"input_ids": jnp.asarray(ids[step][None], jnp.int32),
                 "targets": jnp.asarray(targets[step][None], jnp.int32),
                 "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, B, T)),
                 "segment_ids": jnp.ones((1, B, T), jnp.int32)}
        lora, state, metrics = train_step(lora, state, frozen, batch, cfg=cfg, optimizer=opt)
        ours.append(float(metrics["loss"]))
    ours = np.asarray(ours)
    rel = np.abs(ours - ref) / np.abs(ref)
    assert rel.max() <= 0.01, list(zip(ours.round(4), ref.round(4)))
    assert ours[-1] < 0.9 * ours[0]  # it learned
