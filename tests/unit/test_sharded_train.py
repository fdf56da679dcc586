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
from fastlora_jax.sharding import MeshConfig, shard_params
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
    rep = NamedSharding(mesh, PartitionSpec())
    s_lora = jax.device_put(jax.tree.map(jnp.copy, lora), rep)
    s_opt = jax.device_put(opt.init(lora), rep)
    s_frozen = shard_params(frozen, CFG, mesh)
    s_batch = jax.device_put(b, NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))
    new_lora, _, m = train_step(s_lora, s_opt, s_frozen, s_batch, cfg=cfg, optimizer=opt)
    assert new_lora["layers"]["self_attn"]["q_proj"]["lora_A"].sharding.mesh.size == 8
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(new_lora), jax.tree.leaves(ref_lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
    if not quantized:
        w = s_frozen["layers"]["mlp"]["up_proj"]["weight"]
        assert w.sharding.spec != PartitionSpec()  # the frozen weights really are sharded
