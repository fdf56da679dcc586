"""The training step with the default implementations against an independent path.

The independent path dequantizes the same NF4 codes with a numpy transcription of bitsandbytes'
layout (written here, not the library's `dequantize`), then runs plain dense XLA dots and the
reference attention, without remat. On a GPU the step under test runs the default kernels (the
NF4 dequant / fused matmul kernels, flash attention, remat modes), with and without NF4. On the
CPU the same comparison runs too (the default there is XLA's dequantize-then-dot), in one small
case, so CI checks the NF4 step and this test's own reference every time.
"""

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
from fastlora_jax.quant import QTensor, quantize_nf4
from fastlora_jax.quant.maps import DYNAMIC_MAP, NF4_MAP
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, accumulated_grads

ON_GPU = jax.default_backend() == "gpu"
CFG = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024,
                  num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64)
CASES = ([(q, r) for q in (False, True) for r in (True, "offload")] if ON_GPU else [(True, True)])
B, T = (2, 512) if ON_GPU else (1, 128)


def numpy_dequantize(q: QTensor) -> np.ndarray:
    """float32 [*lead, N, K] from bitsandbytes' NF4 layout: byte i holds element 2i in its high
    nibble and 2i+1 in its low one; block b of 64 elements is scaled by
    DYNAMIC_MAP[absmax[b]] * nested_absmax[b // 256] + nested_offset."""
    n, k = q.shape
    codes = np.asarray(q.codes)
    lead = codes.shape[:-1]
    nibbles = np.stack([codes >> 4, codes & 0x0F], axis=-1).reshape(*lead, -1)[..., :n * k]
    values = NF4_MAP[nibbles]
    absmax = np.asarray(q.absmax)
    nested = np.repeat(np.asarray(q.nested_absmax, np.float32), 256, axis=-1)[..., :absmax.shape[-1]]
    scales = DYNAMIC_MAP[absmax] * nested + np.asarray(q.nested_offset, np.float32)[..., None]
    blocks = absmax.shape[-1]
    padded = np.zeros((*lead, blocks * 64), np.float32)
    padded[..., :n * k] = values
    w = (padded.reshape(*lead, blocks, 64) * scales[..., None]).reshape(*lead, -1)[..., :n * k]
    return w.reshape(*lead, n, k)


@pytest.mark.parametrize("quantized, remat", CASES)
def test_default_step_matches_an_independent_reference(quantized, remat):
    frozen = decoder.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    dense = jax.tree.map(lambda a: a, frozen)
    if quantized:
        for group, name in PROJECTIONS:
            w = np.asarray(frozen["layers"][group][name]["weight"].astype(jnp.float32))
            q = quantize_nf4(w, dtype="bfloat16")
            plain = numpy_dequantize(q)
            assert np.linalg.norm(plain - w) <= 0.15 * np.linalg.norm(w)  # NF4's own error
            frozen["layers"][group][name]["weight"] = jax.tree.map(jnp.asarray, q)
            dense["layers"][group][name]["weight"] = jnp.asarray(plain, jnp.bfloat16)
    spec = resolve(LoraConfig.create(r=8, init_lora_weights=False), CFG,
                   tuple(n for _, n in PROJECTIONS))
    lora = init_lora(spec, CFG, dense)
    rng = np.random.default_rng(0)
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
    lr, nr, gr = jax.jit(lambda l: accumulated_grads(ref, l, dense, batch, None))(lora)
    assert float(nf) == float(nr) == B * (T - 4)
    assert abs(float(lf) - float(lr)) <= 1e-2 * abs(float(lr))
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(b) > 0
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b)
