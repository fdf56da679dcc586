"""The training step on the GPU with the default kernels equals the reference implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ModelConfig
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.ops import Impl
from fastlora_jax.quant import quantize_nf4
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, accumulated_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

CFG = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                  num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("remat", [True, "offload"])
def test_default_gpu_step_matches_reference(quantized, remat):
    frozen = decoder.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    if quantized:
        for group, name in PROJECTIONS:
            w = frozen["layers"][group][name]["weight"]
            frozen["layers"][group][name]["weight"] = jax.tree.map(
                jnp.asarray, quantize_nf4(np.asarray(w.astype(jnp.float32)), dtype="bfloat16"))
    spec = resolve(LoraConfig.create(r=8, init_lora_weights=False), CFG,
                   tuple(n for _, n in PROJECTIONS))
    lora = init_lora(spec, CFG, frozen)
    rng = np.random.default_rng(0)
    B, T = 2, 512
    ids = rng.integers(0, CFG.vocab_size, size=(1, B, T)).astype(np.int32)
    seg = np.repeat(np.arange(1, 5), T // 4)[None, None].repeat(B, axis=1).astype(np.int32)
    pos = np.tile(np.arange(T // 4), 4)[None, None].repeat(B, axis=1).astype(np.int32)
    targets = np.roll(ids, -1, axis=-1)
    targets[np.roll(seg, -1, axis=-1) != seg] = IGNORE
    batch = {k: jnp.asarray(v) for k, v in dict(input_ids=ids, targets=targets, positions=pos,
                                                segment_ids=seg).items()}
    fast = StepConfig(model=CFG, lora=spec, remat=remat)
    ref = StepConfig(model=CFG, lora=spec, remat=False, attention_impl=Impl.REFERENCE)
    lf, nf, gf = jax.jit(lambda l: accumulated_grads(fast, l, frozen, batch, None))(lora)
    lr, nr, gr = jax.jit(lambda l: accumulated_grads(ref, l, frozen, batch, None))(lora)
    assert float(nf) == float(nr)
    assert abs(float(lf) - float(lr)) <= 1e-2 * abs(float(lr))
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b) + 1e-6
