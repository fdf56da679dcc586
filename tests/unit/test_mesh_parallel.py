"""A QLoRA model on 8 fake CPU devices: sharded NF4 weights, per-shard kernels, and the same
loss and LoRA gradients as one device, for data x fsdp x tensor meshes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fastlora_jax import ModelConfig
from fastlora_jax.errors import ConfigError
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.ops import Impl, linear
from fastlora_jax.quant import QTensor, dequantize, quantize_nf4
from fastlora_jax.sharding import MeshConfig, ShardingFallbackWarning, shard_params
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, accumulated_grads

# Every projection splits on every mesh below with whole 64-element NF4 blocks per shard.
CFG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=512,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32)
MESHES = [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1, fsdp=8, tensor=1),
          MeshConfig(data=1, fsdp=2, tensor=4)]


def nf4_model(cfg: ModelConfig = CFG) -> dict:
    frozen = decoder.init_params(cfg, jax.random.key(0))
    for group, name in PROJECTIONS:
        w = frozen["layers"][group][name]["weight"]
        frozen["layers"][group][name]["weight"] = jax.tree.map(
            jnp.asarray, quantize_nf4(np.asarray(w), dtype="float32"))
    return frozen


def make_batch(acc: int, b: int, t: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(acc, b, t)).astype(np.int32)
    targets = np.roll(ids, -1, axis=-1)
    targets[..., -1] = IGNORE
    targets[rng.random(targets.shape) < 0.3] = IGNORE
    segs = np.ones_like(ids)
    segs[:, :, t // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
    return {"input_ids": ids, "targets": targets, "segment_ids": segs,
            "positions": np.broadcast_to(pos, ids.shape).copy()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def setup():
    frozen = nf4_model()
    spec = resolve(LoraConfig.create(r=4, init_lora_weights=False), CFG,
                   tuple(n for _, n in PROJECTIONS))
    lora = init_lora(spec, CFG, frozen)
    return frozen, spec, lora, make_batch(1, 8, 16, seed=1)


def grads_fn(cfg: StepConfig):
    return jax.jit(lambda lora, frozen, batch: accumulated_grads(cfg, lora, frozen, batch, None))


@pytest.mark.parametrize("impl", [Impl.PALLAS, Impl.XLA], ids=["pallas-interpret", "xla"])
def test_meshes_match_one_device(setup, impl):
    """Loss and LoRA grads of 2x2x2, 1x8x1, 1x2x4 meshes equal one device's (<= 1e-5 rel), and
    the compiled step holds about 1/(fsdp*tensor) of the frozen bytes per device."""
    frozen, spec, lora, batch = setup
    cfg = StepConfig(model=CFG, lora=spec, remat=True, attention_impl=impl)
    fn = grads_fn(cfg)
    ref_loss, _, ref_grads = fn(lora, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    total_frozen = sum(a.nbytes for a in jax.tree.leaves(frozen))
    for mesh_cfg in MESHES:
        mesh = mesh_cfg.make_mesh()
        mesh_cfg.check_model(CFG, mesh)
        with jax.set_mesh(mesh):
            s_frozen = shard_params(frozen, CFG, mesh)
            s_lora = jax.device_put(lora, NamedSharding(mesh, PartitionSpec()))
            s_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))
            compiled = fn.lower(s_lora, s_frozen, s_batch).compile()
            loss, _, grads = compiled(s_lora, s_frozen, s_batch)
        name = f"{mesh_cfg} {impl}"
        assert rel_err(loss, ref_loss) <= 1e-5, name
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(ref_grads)):
            assert rel_err(g, r) <= 1e-5, (name, jax.tree_util.keystr(path), rel_err(g, r))
        # Per-device argument bytes from the executable, minus the (replicated) LoRA and the
        # batch's shard: what is left is the frozen weights' share on one device.
        args = compiled.memory_analysis().argument_size_in_bytes
        others = (sum(a.nbytes for a in jax.tree.leaves(lora))
                  + sum(a.nbytes for a in jax.tree.leaves(batch)) // (mesh_cfg.data * mesh_cfg.fsdp))
        per_device = args - others
        shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
        assert per_device <= 1.1 * total_frozen / shards, (name, per_device, total_frozen / shards)
        assert per_device >= total_frozen / shards * 0.9, (name, per_device)
