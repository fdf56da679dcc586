"""DPO loss and LoRA gradients equal TRL's DPOTrainer on fixed preference pairs (sigmoid, ipo,
hinge), with the reference = the base model (ours: the same frozen tree with adapters off; TRL:
a separately loaded base model passed as ref_model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.train.dpo_loss import DPOLossConfig, DPOObjective, reference_logprob_sums
from fastlora_jax.train.rl_step import loss_and_grads
from fastlora_jax.train.step import StepConfig
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint
from tests.parity.test_grpo_fidelity import _peft_grads
from fastlora_jax.testing.refenv import run_reference

pytestmark = [pytest.mark.reference]

A, B, S, BETA = 2, 3, 12, 0.1
CASES = [("sigmoid",), ("ipo",), ("hinge",), ("sigmoid", "ipo")]

TRL_SCRIPT = """
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

tok = AutoTokenizer.from_pretrained(ARGS["tokenizer"])
data = Dataset.from_dict({"prompt": ["a"] * 4, "chosen": ["b"] * 4, "rejected": ["c"] * 4})
for index, loss_type in enumerate(ARGS["cases"]):
    model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ARGS["adapter"], is_trainable=True)
    ref_model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
    args = DPOConfig(output_dir=ARGS["out"], per_device_train_batch_size=ARGS["B"],
                     gradient_accumulation_steps=ARGS["A"], beta=ARGS["beta"], loss_type=loss_type,
                     report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data,
                         processing_class=tok)
    trainer.model.train()
    total = 0.0
    for a in range(ARGS["A"]):
        inputs = {k: torch.tensor(INPUTS[k][a]) for k in ("input_ids", "attention_mask",
                                                          "completion_mask")}
        loss = trainer.compute_loss(trainer.model, inputs) / ARGS["A"]  # the HF Trainer's scaling
        loss.backward()
        total += loss.item()
    OUTPUTS[f"{index}|loss"] = np.float64(total)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            OUTPUTS[f"{index}|grad|{name}"] = p.grad.numpy()
with torch.no_grad():
    ref_model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
    ids = torch.tensor(INPUTS["input_ids"][0])
    logits = ref_model(input_ids=ids, attention_mask=torch.tensor(INPUTS["attention_mask"][0])).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    OUTPUTS["base_sums"] = (logp * torch.tensor(INPUTS["completion_mask"][0])[:, 1:]).sum(-1).numpy()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    base = write_checkpoint(tmp / "base", TINY_LLAMA, llama_tensors(TINY_LLAMA))
    model, _ = FastLanguageModel.from_pretrained(base, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.save_pretrained(tmp / "adapter")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY_LLAMA["vocab_size"], (A, 2 * B, S)).astype(np.int64)
    prompt = rng.integers(2, 5, (A, B))
    lengths = np.minimum(prompt[..., None] + rng.integers(2, 7, (A, B, 2)), S)   # [A, B, 2]
    lengths = np.concatenate([lengths[..., 0], lengths[..., 1]], axis=1)          # [A, 2B]
    starts = np.concatenate([prompt, prompt], axis=1)
    ids[:, B:, :] = np.where(np.arange(S) < starts[:, B:, None], ids[:, :B, :], ids[:, B:, :])
    col = np.arange(S)[None, None, :]
    attention = (col < lengths[..., None]).astype(np.int64)
    completion = ((col >= starts[..., None]) & (col < lengths[..., None])).astype(np.int64)
    arrays = dict(input_ids=ids, attention_mask=attention, completion_mask=completion)
    ref = run_reference(TRL_SCRIPT, arrays, base=str(base), adapter=str(tmp / "adapter"),
                        tokenizer=str(smollm2_dir), out=str(tmp / "trl_out"),
                        cases=[list(c) for c in CASES], A=A, B=B, beta=BETA)
    cfg = StepConfig(model=model.config, lora=model.lora_spec, remat=False, loss_chunk=16)
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in arrays.items()}
    return model, cfg, batch, ref


@pytest.mark.parametrize("index", range(len(CASES)), ids=["+".join(c) for c in CASES])
def test_dpo_loss_and_grads_equal_trl(setup, index):
    model, cfg, batch, ref = setup
    lcfg = DPOLossConfig(beta=BETA, loss_type=CASES[index])
    lora = model.lora_params()
    loss, metrics, grads = loss_and_grads(lora, model.params(), batch,
                                          objective=DPOObjective(cfg, lcfg))
    want = float(ref[f"{index}|loss"])
    assert abs(float(loss) - want) <= 1e-4 * abs(want), (float(loss), want)
    for ours, theirs in zip(jax.tree.leaves(jax.tree.map(np.asarray, grads)),
                            jax.tree.leaves(_peft_grads(ref, index, lora))):
        scale = np.abs(theirs).max()
        assert scale > 0
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
    assert 0.0 <= float(metrics["rewards/accuracies"]) <= 1.0


def test_adapters_off_reference_equals_base_model_and_precomputed_path(setup):
    """The reference pass (adapters off on the trained model's frozen tree) equals a separately
    loaded base model's log-probs; feeding them precomputed gives the same loss and grads."""
    model, cfg, batch, ref = setup
    sums = np.asarray(reference_logprob_sums(model.params(), batch["input_ids"][0],
                                             batch["attention_mask"][0],
                                             batch["completion_mask"][0], cfg=cfg))
    np.testing.assert_allclose(sums, ref["base_sums"], rtol=1e-5, atol=1e-5)
    all_sums = jnp.stack([reference_logprob_sums(model.params(), batch["input_ids"][a],
                                                 batch["attention_mask"][a],
                                                 batch["completion_mask"][a], cfg=cfg)
                          for a in range(A)])
    pre = dict(batch, ref_chosen_logps=all_sums[:, :B], ref_rejected_logps=all_sums[:, B:])
    objective = DPOObjective(cfg, DPOLossConfig(beta=BETA))
    loss_a, _, grads_a = loss_and_grads(model.lora_params(), model.params(), batch,
                                        objective=objective)
    loss_b, _, grads_b = loss_and_grads(model.lora_params(), model.params(), pre,
                                        objective=objective)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)
