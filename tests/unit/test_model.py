"""The model's pure form, packing semantics and sharded forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ModelConfig, apply, split
from fastlora_jax.models import decoder
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.sharding import MeshConfig, batch_sharding, param_shardings, shard_params

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)


def model(key=0, dtype=jnp.float32):
    return CausalLM(CFG, decoder.init_params(CFG, jax.random.key(key), dtype))


def ids(batch=2, seq=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, CFG.vocab_size, jnp.int32)


def test_pure_form_equals_module_call():
    """split has one shape with or without adapters; apply of its parts is the module's call."""
    from fastlora_jax.lora import LoraConfig, init_lora, resolve
    from fastlora_jax.lora.spec import PROJECTIONS

    m = model()
    x = ids()
    pure = jax.jit(apply, static_argnums=0)
    graphdef, frozen, lora = split(m)
    assert not jax.tree.leaves(lora)
    out = pure(graphdef, frozen, lora, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(m(x)))
    assert out.shape == (2, 12, CFG.vocab_size)
    spec = resolve(LoraConfig.create(r=2, init_lora_weights=False), CFG,
                   tuple(n for _, n in PROJECTIONS))
    m.set_adapter(spec, init_lora(spec, CFG, m.params()))
    graphdef, frozen, lora = split(m)
    assert len(jax.tree.leaves(lora)) == 2 * len(PROJECTIONS)
    with_lora = pure(graphdef, frozen, lora, x)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(m(x)))
    assert not np.allclose(np.asarray(with_lora), np.asarray(out))


def test_every_param_has_logical_axes():
    m = model()
    _, state, _ = split(m)
    leaves = jax.tree.leaves(state, is_leaf=lambda v: hasattr(v, "get_metadata"))
    assert leaves
    for var in leaves:
        axes = var.get_metadata()["axes"]
        assert len(axes) == var[...].ndim


def test_packed_rows_equal_separate_sequences():
    """Two sequences packed in one row with segment ids and restarted positions give the same
    logits as each run alone, and changing one leaves the other's logits bit-identical."""
    m = model()
    a, b = ids(1, 7, seed=1), ids(1, 5, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)
    pos = jnp.asarray([list(range(7)) + list(range(5))], jnp.int32)
    out = m(packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out[:, :7]), np.asarray(m(a)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[:, 7:]), np.asarray(m(b)), atol=1e-5)
    other = jnp.concatenate([a, ids(1, 5, seed=3)], axis=1)
    out2 = m(other, positions=pos, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(out2[:, :7]), np.asarray(out[:, :7]))
    assert not np.allclose(np.asarray(out2[:, 7:]), np.asarray(out[:, 7:]))


def test_bfloat16_model_runs_close_to_float32():
    m32, m16 = model(dtype=jnp.float32), model(dtype=jnp.bfloat16)
    x = ids()
    o32, o16 = m32(x), m16(x)
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o16, np.float32), np.asarray(o32), atol=0.1)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2),
                                      MeshConfig(data=1, fsdp=8, tensor=1),
                                      MeshConfig(data=2, fsdp=1, tensor=4)])
def test_sharded_forward_equals_unsharded(mesh_cfg):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    m = model()
    params = m.params()
    x = ids(batch=4)
    expected = np.asarray(m(x))
    mesh = mesh_cfg.make_mesh()
    sharded = shard_params(params, CFG, mesh)
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, param_shardings(CFG, mesh)))
    assert any(any(p is not None for p in spec) for spec in specs)  # something is sharded
    fwd = jax.jit(lambda p, t: decoder.forward(CFG, p, t),
                  in_shardings=(param_shardings(CFG, mesh), batch_sharding(mesh, x.shape)))
    out = fwd(sharded, jax.device_put(x, batch_sharding(mesh, x.shape)))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)
