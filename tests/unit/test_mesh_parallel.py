"""A QLoRA model on 8 fake CPU devices: sharded NF4 weights, per-shard kernels, and the same
loss and LoRA gradients as one device, for data x fsdp x tensor meshes."""

from __future__ import annotations

import dataclasses
import re

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
from fastlora_jax.quant import QTensor, dequantize, quantize_int8, quantize_nf4, tile, untile
from fastlora_jax.sharding import (MeshConfig, ShardingFallbackWarning, quantized_placement,
                                  shard_params)
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
    # 8 x 8 = 64 tokens: one device and every shard take the same NF4 kernel (the fused one runs
    # at most 64 rows), so the meshes are compared with the kernel they run.
    return frozen, spec, lora, make_batch(1, 8, 8, seed=1)


def grads_fn(cfg: StepConfig):
    return jax.jit(lambda lora, frozen, batch: accumulated_grads(cfg, lora, frozen, batch, None))


@pytest.mark.parametrize("impl", [Impl.PALLAS_TRITON, Impl.XLA], ids=["pallas-interpret", "xla"])
def test_meshes_match_one_device(setup, impl):
    """Loss and LoRA grads of 2x2x2, 1x8x1, 1x2x4 meshes equal one device's (<= 1e-5 rel), with
    attention and the NF4 frozen matmuls both run by `impl` (the Pallas kernels interpreted, per
    shard, or XLA), and the compiled step holds about 1/(fsdp*tensor) of the frozen bytes per
    device."""
    frozen, spec, lora, batch = setup
    cfg = StepConfig(model=CFG, lora=spec, remat=True, attention_impl=impl, linear_impl=impl)
    fn = grads_fn(cfg)
    ref_loss, _, ref_grads = fn(lora, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    jaxpr = str(jax.make_jaxpr(fn)(lora, frozen, batch))
    # the kernels really run: attention + the 7 NF4 projections, forward and backward
    kernels = jaxpr.count("pallas_call")
    assert (kernels >= 8) == (impl is Impl.PALLAS_TRITON), kernels
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
        # FSDP gathers one layer's NF4 codes at a time inside the scan, never the stacked weights
        gathers = re.findall(r"u8\[(\d+),\d+,\d+\]\S* all-gather\(", compiled.as_text())
        assert gathers and set(gathers) == {"1"}, (name, gathers)


def place(q: QTensor, axes, mesh) -> QTensor:
    view, specs, unplaced = quantized_placement(q, ("layers",) * len(q.lead) + tuple(axes),
                                                mesh.shape)
    assert not unplaced
    return dataclasses.replace(view, **{f: jax.device_put(getattr(view, f), NamedSharding(mesh, s))
                                        for f, s in specs.items()})


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_linear_kernel_per_shard(kind):
    """The Pallas NF4 / int8 matmul (interpreted) run per shard, column split (gate: tensor on
    out) and row split (down: tensor on in, psum), equals the one-device kernel, forward and dx."""
    rng = np.random.default_rng(0)
    quantize = (lambda w: quantize_nf4(w, dtype="float32")) if kind == "nf4" else \
        (lambda w: quantize_int8(w, dtype="float32"))
    x = jnp.asarray(rng.standard_normal((8, 4, 256)), jnp.float32)
    xd = jnp.asarray(rng.standard_normal((8, 4, 512)), jnp.float32)
    cases = [(x, quantize(0.05 * rng.standard_normal((512, 256)).astype(np.float32)), ("mlp", "embed")),
             (xd, quantize(0.05 * rng.standard_normal((256, 512)).astype(np.float32)), ("embed", "mlp"))]
    mesh = MeshConfig(data=1, fsdp=2, tensor=4).make_mesh()
    for xi, w, axes in cases:
        w = jax.tree.map(jnp.asarray, w)

        def f(xx, ww, axes_=None):
            return jnp.sum(jnp.sin(linear(xx, ww, impl=Impl.PALLAS_TRITON, axes=axes_)))

        ref, ref_dx = jax.value_and_grad(f)(xi, w)  # eager: the kernel modules import outside jit
        with jax.set_mesh(mesh):
            ws = place(w, axes, mesh)
            assert ws.codes.sharding.spec != PartitionSpec()
            got, dx = jax.jit(jax.value_and_grad(lambda a, b: f(a, b, axes)))(xi, ws)
        assert rel_err(got, ref) <= 1e-5 and rel_err(dx, ref_dx) <= 1e-5, (kind, axes)


def test_tile_is_a_view_and_shards_dequantize_alone():
    w = np.random.default_rng(1).standard_normal((2, 96, 128)).astype(np.float32)
    q = jax.tree.map(jnp.asarray, quantize_nf4(w, dtype="float32"))
    t = tile(q)
    assert t.tiled and t.lead == (2,) and t.codes.shape == (2, 96, 64)
    np.testing.assert_array_equal(dequantize(t), dequantize(q))
    np.testing.assert_array_equal(untile(t).codes, q.codes)
    # each (row, block) piece of a 2 x 2 split dequantizes with only its own bytes
    mesh = MeshConfig(data=2, fsdp=2, tensor=2).make_mesh()
    s = place(q, ("mlp", "embed"), mesh)
    shard_bytes = {sh.data.nbytes for sh in s.codes.addressable_shards}
    assert shard_bytes == {q.codes.nbytes // 4}


def test_unshardable_weights_fall_back_with_one_warning():
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=128, intermediate_size=196,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64)
    frozen = nf4_model(cfg)
    mesh = MeshConfig(data=1, fsdp=4, tensor=2).make_mesh()
    with pytest.warns(ShardingFallbackWarning) as record:
        placed = shard_params(frozen, cfg, mesh)
    assert len(record) == 1
    message = str(record[0].message)
    # gate_proj [196, 128]: tensor splits the 196 rows; fsdp fits neither 128/4 (not whole
    # 64-blocks) nor 196/8 rows. down_proj [128, 196]: rows of 196 hold no whole blocks at all.
    assert "layers.mlp.gate_proj.weight [196, 128] (whole along fsdp)" in message
    assert "layers.mlp.down_proj.weight [128, 196] (whole along fsdp, tensor)" in message
    assert "q_proj" not in message and "o_proj" not in message
    # q_proj [128, 128]: 128/4 = 32 columns would cut blocks, so fsdp moves to the rows (8 ways)
    q = placed["layers"]["self_attn"]["q_proj"]["weight"]
    assert {sh.data.shape for sh in q.codes.addressable_shards} == {(1, 16, 64)}
    o = placed["layers"]["self_attn"]["o_proj"]["weight"]  # rows over fsdp, 64-blocks over tensor
    assert {sh.data.shape for sh in o.codes.addressable_shards} == {(1, 32, 32)}


@pytest.mark.parametrize("mesh_cfg, devices, pattern", [
    (MeshConfig(data=2, fsdp=2, tensor=4), 8, "data\\*fsdp\\*tensor = 16 must equal the number of devices, 8"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), 8, "8 devices are not a multiple of the fixed axes' product 3"),
    (MeshConfig(data=0, fsdp=8, tensor=1), 8, "axis sizes must be >= 1"),
])
def test_bad_mesh_errors_name_the_sizes(mesh_cfg, devices, pattern):
    with pytest.raises(ConfigError, match=pattern):
        mesh_cfg.make_mesh(jax.devices()[:devices])


def test_tensor_axis_larger_than_heads_is_an_error():
    mesh = MeshConfig(data=1, fsdp=1, tensor=8).make_mesh()
    with pytest.raises(ConfigError, match="tensor=8 must divide the model's num_kv_heads=4"):
        MeshConfig(data=1, fsdp=1, tensor=8).check_model(CFG, mesh)
