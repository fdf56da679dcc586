"""Generation on the GPU: the NF4 decode loop runs the fused kernels on the packed codes, with
no dense copy of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ModelConfig
from fastlora_jax.generation import Generator, engine
from fastlora_jax.models import decoder
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.quant import quantize_nf4

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

CFG = ModelConfig(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=1024,
                  num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)


def _nf4_model() -> CausalLM:
    params = decoder.init_params(CFG, jax.random.key(0), jnp.bfloat16)
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            w = np.asarray(params["layers"][group][name]["weight"].astype(jnp.float32)) * 5
            params["layers"][group][name]["weight"] = jax.tree.map(
                jnp.asarray, quantize_nf4(w, dtype="bfloat16"))
    return CausalLM(CFG, params, max_seq_length=256)


def test_nf4_decode_loop_reads_codes_not_dense_weights():
    model = _nf4_model()
    gen = Generator(model)
    spec, inputs = gen.spec_and_inputs([[5, 6, 7, 8, 9]], model.generation_config.sampling(), 16,
                                       (), 0, False)
    state = engine.prefill_jit(spec, gen.frozen, None, inputs["prompt"], inputs["start"],
                               jax.random.key(0), inputs["max_new"], inputs["row_ids"],
                               inputs["done"])
    compiled = engine.decode_jit.lower(spec, gen.frozen, None, state, 16).compile()
    dense_bytes = 2 * CFG.num_layers * CFG.hidden_size * (2 * 512 + 2 * 128 + 3 * 1024)
    assert compiled.memory_analysis().temp_size_in_bytes < dense_bytes / 4
    assert "custom-call" in compiled.as_text()           # the fused NF4 kernels

