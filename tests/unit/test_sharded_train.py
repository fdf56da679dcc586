"""The training step under a (data, fsdp, tensor) mesh equals the single-device step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fastlora_jax import ModelConfig
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.quant import quantize_nf4
from fastlora_jax.sharding import MeshConfig, batch_sharding, replicated, shard_params
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step
from tests.unit.test_train_step import batch

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("mesh_cfg, quantized", [(MeshConfig(data=2, fsdp=4, tensor=1), False),
                                                 (MeshConfig(data=2, fsdp=2, tensor=2), False),
                                                 (MeshConfig(data=2, fsdp=4, tensor=1), True)])
def test_sharded_step_equals_single_device(mesh_cfg, quantized):
    assert len(jax.devices()) == 8
    frozen = decoder.init_params(CFG, jax.random.key(0))
    if quantized:
        for group, name in PROJECTIONS:
            w = frozen["layers"][group][name]["weight"]
            frozen["layers"][group][name]["weight"] = jax.tree.map(
                jnp.asarray, quantize_nf4(np.asarray(w), dtype="float32"))
    spec = resolve(LoraConfig.create(r=4, init_lora_weights=False), CFG,
                   tuple(n for _, n in PROJECTIONS))
    lora = init_lora(spec, CFG, frozen)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=4, weight_decay=0.01)
    cfg = StepConfig(model=CFG, lora=spec, remat=True)
    b = batch(2, 8, 16, seed=1)  # token ids < 80, inside this model's vocabulary of 128

    ref_lora, _, ref_m = train_step(jax.tree.map(jnp.copy, lora), opt.init(lora), frozen, b,
                                    cfg=cfg, optimizer=opt)
    mesh = mesh_cfg.make_mesh()
    s_lora = jax.device_put(jax.tree.map(jnp.copy, lora), replicated(mesh))
    s_opt = jax.device_put(opt.init(lora), replicated(mesh))
    s_frozen = shard_params(frozen, CFG, mesh)
    # what the trainer does: [A, B, T] with the batch axis B over (data, fsdp)
    sharding = batch_sharding(mesh, b["input_ids"].shape, batch_axis=1)
    assert sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))), 3)
    s_batch = jax.device_put(b, sharding)
    new_lora, _, m = train_step(s_lora, s_opt, s_frozen, s_batch, cfg=cfg, optimizer=opt)
    assert new_lora["layers"]["self_attn"]["q_proj"]["lora_A"].sharding.mesh.size == 8
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(new_lora), jax.tree.leaves(ref_lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
    if not quantized:
        w = s_frozen["layers"]["mlp"]["up_proj"]["weight"]
        assert w.sharding.spec != PartitionSpec()  # the frozen weights really are sharded


def test_trainer_on_a_mesh_equals_single_device(tmp_path, smollm2_dir):
    """SFTTrainer with `mesh` shards the batch (sharding.batch_sharding over [A, B, T], each
    data x fsdp group's rows from its own data shard) and the frozen weights, and trains the
    same adapter as the one-device step fed the same batches."""
    from fastlora_jax import FastLanguageModel, SFTTrainer, TrainingArguments
    from fastlora_jax.demo import make_examples, write_jsonl
    from tests.checkpoints import tiny_chat_model

    folder = tiny_chat_model(tmp_path / "tiny", smollm2_dir)
    data = write_jsonl(make_examples(64, seed=3), tmp_path / "data.jsonl")
    model, tokenizer = FastLanguageModel.from_pretrained(folder, max_seq_length=64,
                                                         dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    start = jax.tree.map(np.asarray, model.lora_params())
    # 16 rows a step: 1 row x (data 2 * fsdp 4) groups x 2 micro-batches
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                             packing=True, report_to="none", disable_tqdm=True,
                             use_gradient_checkpointing=False,
                             mesh=MeshConfig(data=2, fsdp=4, tensor=1))
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=str(data), args=args)
    batches = []
    for step in range(2):
        batch, _, _ = trainer._batch(step)
        assert batch["input_ids"].shape[:2] == (2, 8)
        assert batch["input_ids"].sharding.spec[0] is None  # the accumulation axis
        assert len(batch["input_ids"].sharding.device_set) == 8
        batches.append({k: jnp.asarray(np.asarray(v)) for k, v in batch.items()})
    loss = trainer.train()["final_loss"]
    lora, opt_state = jax.tree.map(jnp.asarray, start), trainer.optimizer.init(start)
    for b in batches:  # the same steps on one device
        lora, opt_state, m = train_step(lora, opt_state, model.params(), b,
                                        cfg=trainer.step_config, optimizer=trainer.optimizer)
    np.testing.assert_allclose(loss, float(m["loss"]), rtol=1e-5)
    got = model.lora_params()
    for path, a in jax.tree_util.tree_flatten_with_path(lora)[0]:
        b = got
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
