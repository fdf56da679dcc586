"""GRPO loss, LoRA gradients and metrics equal TRL's GRPOTrainer on a fixed batch (no sampling).

A tiny random Llama with random LoRA A and B (so every gradient is non-zero) is loaded by us and by
transformers + peft; TRL's `GRPOTrainer.compute_loss` runs on the same prompts, completions,
advantages, old-policy and reference log-probs for every loss type, beta 0 and > 0, token and
sequence importance sampling, over two accumulated micro-batches.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.train.grpo_loss import GRPOLossConfig, GRPOObjective, score_completions
from fastlora_jax.train.rl_step import loss_and_grads
from fastlora_jax.train.step import StepConfig
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint
from fastlora_jax.testing.refenv import run_reference

pytestmark = [pytest.mark.reference]

A, B, P, C = 2, 4, 5, 6          # micro-batches, completions per micro-batch, prompt, completion
TEMPERATURE, EPS, EPS_HIGH = 0.7, 0.2, 0.28
CASES = [dict(loss_type=lt, beta=beta, importance_sampling_level=lvl)
         for lt, beta, lvl in itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), (0.0, 0.04),
                                                 ("token", "sequence"))]

TRL_SCRIPT = """
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

tok = AutoTokenizer.from_pretrained(ARGS["tokenizer"])
for index, case in enumerate(ARGS["cases"]):
    model = AutoModelForCausalLM.from_pretrained(ARGS["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ARGS["adapter"], is_trainable=True)
    args = GRPOConfig(output_dir=ARGS["out"], per_device_train_batch_size=ARGS["B"],
                      gradient_accumulation_steps=ARGS["A"], num_generations=ARGS["B"],
                      max_completion_length=ARGS["C"], temperature=ARGS["temperature"],
                      epsilon=ARGS["eps"], epsilon_high=ARGS["eps_high"], num_iterations=2,
                      report_to="none", use_cpu=True, bf16=False, **case)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}),
                          processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ARGS["A"]
    total = 0.0
    for a in range(ARGS["A"]):
        inputs = {"prompt_ids": torch.tensor(INPUTS["prompt_ids"][a]),
                  "prompt_mask": torch.ones_like(torch.tensor(INPUTS["prompt_ids"][a])),
                  "completion_ids": torch.tensor(INPUTS["completion_ids"][a]),
                  "completion_mask": torch.tensor(INPUTS["completion_mask"][a]),
                  "advantages": torch.tensor(INPUTS["advantages"][a]),
                  "old_per_token_logps": torch.tensor(INPUTS["old_logps"][a]),
                  "ref_per_token_logps": torch.tensor(INPUTS["ref_logps"][a]),
                  "num_items_in_batch": torch.tensor(INPUTS["completion_mask"].sum(), dtype=torch.float32)}
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        total += loss.item()
    OUTPUTS[f"{index}|loss"] = np.float64(total)
    for key, values in trainer._metrics["train"].items():
        OUTPUTS[f"{index}|metric|{key}"] = np.asarray(values)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            OUTPUTS[f"{index}|grad|{name}"] = p.grad.numpy()
"""


def _peft_grads(outputs: dict[str, np.ndarray], index: int, like: dict) -> dict:
    """PEFT's per-layer grads (base_model.model.model.layers.<i>.<group>.<name>.lora_X.default
    .weight) stacked into our LoRA tree layout."""
    tree: dict = {"layers": {}}
    for group, modules in like["layers"].items():
        for name, entry in modules.items():
            for kind in entry:
                layers = entry[kind].shape[0]
                tree["layers"].setdefault(group, {}).setdefault(name, {})[kind] = np.stack([
                    outputs[f"{index}|grad|base_model.model.model.layers.{i}.{group}.{name}."
                            f"{kind}.default.weight"] for i in range(layers)])
    return tree


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("grpo")
    base = write_checkpoint(tmp / "base", TINY_LLAMA, llama_tensors(TINY_LLAMA))
    model, _ = FastLanguageModel.from_pretrained(base, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.save_pretrained(tmp / "adapter")
    rng = np.random.default_rng(0)
    V = TINY_LLAMA["vocab_size"]
    prompt_ids = rng.integers(0, V, (A, B, P)).astype(np.int64)
    completion_ids = rng.integers(0, V, (A, B, C)).astype(np.int64)
    lengths = rng.integers(2, C + 1, (A, B))
    completion_mask = (np.arange(C)[None, None, :] < lengths[..., None]).astype(np.int64)
    advantages = rng.normal(size=(A, B)).astype(np.float32)
    # old / reference log-probs near the policy's (~ -log V) so that ratios straddle the clip range
    cfg = StepConfig(model=model.config, lora=model.lora_spec, remat=False, loss_chunk=7)
    ids = np.concatenate([prompt_ids, completion_ids], -1)
    attn = np.concatenate([np.ones_like(prompt_ids), completion_mask], -1)
    current = np.stack([np.asarray(score_completions(
        model.lora_params(), model.params(), jnp.asarray(ids[a], jnp.int32),
        jnp.asarray(attn[a], jnp.int32), cfg=cfg, temperature=TEMPERATURE, completion_width=C))
        for a in range(A)])
    old_logps = (current + 0.25 * rng.normal(size=current.shape)).astype(np.float32)
    ref_logps = (current + 0.3 * rng.normal(size=current.shape)).astype(np.float32)
    arrays = dict(prompt_ids=prompt_ids, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages, old_logps=old_logps,
                  ref_logps=ref_logps)
    ref = run_reference(TRL_SCRIPT, arrays, base=str(base), adapter=str(tmp / "adapter"),
                        tokenizer=str(smollm2_dir), out=str(tmp / "trl_out"), cases=CASES, A=A, B=B,
                        C=C, temperature=TEMPERATURE, eps=EPS, eps_high=EPS_HIGH)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(attn, jnp.int32),
             "completion_mask": jnp.asarray(completion_mask, jnp.int32),
             "advantages": jnp.asarray(advantages), "old_logps": jnp.asarray(old_logps),
             "ref_logps": jnp.asarray(ref_logps),
             "dapo_normalizer": jnp.full((A,), float(completion_mask.sum()), jnp.float32)}
    return model, cfg, batch, ref


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=["-".join(str(v) for v in c.values()) for c in CASES])
def test_loss_grads_and_metrics_equal_trl(setup, index):
    model, cfg, batch, ref = setup
    case = CASES[index]
    lcfg = GRPOLossConfig(loss_type=case["loss_type"], beta=case["beta"], epsilon_low=EPS,
                          epsilon_high=EPS_HIGH,
                          importance_sampling_level=case["importance_sampling_level"],
                          temperature=TEMPERATURE, max_completion_length=C)
    lora = model.lora_params()
    loss, metrics, grads = loss_and_grads(lora, model.params(), batch,
                                          objective=GRPOObjective(cfg, lcfg))
    want = float(ref[f"{index}|loss"])
    assert abs(float(loss) - want) <= 1e-4 * abs(want) + 1e-7, (float(loss), want)
    ref_grads = _peft_grads(ref, index, lora)
    flat_ours = jax.tree.leaves(jax.tree.map(np.asarray, grads))
    flat_ref = jax.tree.leaves(ref_grads)
    assert len(flat_ours) == len(flat_ref) == 2 * 7
    for ours, theirs in zip(flat_ours, flat_ref):
        scale = np.abs(theirs).max()
        assert scale > 0
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
    # metrics: TRL logs one mean per micro-batch, ours is the step's pooled mean: weigh TRL's by
    # each micro-batch's count (tokens; sequences for a sequence-level clip ratio)
    mask = np.asarray(batch["completion_mask"], np.float64)
    for key in ["clip_ratio/region_mean", "entropy"] + (["kl"] if case["beta"] else []):
        per_micro = ref[f"{index}|metric|{key}"]
        per_sequence = case["importance_sampling_level"] == "sequence" and key.startswith("clip")
        weights = np.full(A, B) if per_sequence else mask.sum(axis=(1, 2))
        want_metric = float(np.sum(per_micro * weights) / np.sum(weights))
        assert abs(float(metrics[key]) - want_metric) <= 1e-4 * max(1.0, abs(want_metric)), key
    if index == 0:  # the perturbed old log-probs put some tokens outside the clip range
        assert float(metrics["clip_ratio/region_mean"]) > 0


def test_reference_pass_equals_separately_loaded_base_model(setup, tmp_path):
    """Adapters off on the trained model's frozen tree = a base model loaded on its own."""
    model, cfg, batch, _ = setup
    base, _ = FastLanguageModel.from_pretrained(model.name_or_path, dtype="float32")
    ids = batch["input_ids"][0]
    ours = score_completions(None, model.params(), ids, batch["attention_mask"][0], cfg=cfg,
                             temperature=TEMPERATURE, completion_width=C)
    logits = base(ids)[:, P - 1:-1]                                    # prompts are unpadded
    logp = jax.nn.log_softmax(logits / TEMPERATURE, axis=-1)
    want = jnp.take_along_axis(logp, ids[:, P:, None], axis=-1)[..., 0]
    mask = np.asarray(batch["completion_mask"][0], bool)
    np.testing.assert_allclose(np.asarray(ours)[mask], np.asarray(want)[mask], rtol=1e-5,
                               atol=1e-5)
    policy = score_completions(model.lora_params(), model.params(), ids,
                               batch["attention_mask"][0], cfg=cfg, temperature=TEMPERATURE,
                               completion_width=C)
    assert np.abs(np.asarray(policy) - np.asarray(ours))[mask].max() > 1e-2  # adapters matter
