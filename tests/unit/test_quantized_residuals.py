"""The quantized linear's backward keeps the quantized weight, not its dense dequantization.

`ops.linear`'s XLA path (the default for training shapes) re-dequantizes in its backward; the
reference (`impl="reference"`) is JAX's autodiff of dequantize-then-dot, which keeps every
layer's dense weight from the forward to the backward. Same loss and LoRA gradients; no residual
of a dense weight's shape; compiled temporaries smaller by about the dense weights' bytes.
"""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ModelConfig
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import is_projection
from fastlora_jax.ops import Impl
from fastlora_jax.quant import QuantKind, quantize, stack
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, loss_sums

# Every projection shape distinct from every activation's trailing dims (tokens = 2 x 24).
CFG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=192,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
ALL = tuple(n for _, n in PROJECTIONS)


def quantized_model(kind: QuantKind, config: ModelConfig = CFG) -> dict:
    """Random bf16 parameters with every decoder projection quantized to `kind`, layer by layer."""
    dense = decoder.init_params(config, jax.random.key(0))
    params: dict = {}
    for spec in decoder.param_specs(config):
        value = dense
        for key in spec.path:
            value = value[key]
        if is_projection(spec):
            value = stack([quantize(np.asarray(value[i], np.float32), kind, dtype="bfloat16")
                           for i in range(spec.shape[0])])
            value = jax.tree.map(jnp.asarray, value)
        decoder.set_path(params, spec.path, value)
    return params


def micro_batch(b: int, t: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(b, t)).astype(np.int32)
    targets = np.roll(ids, -1, axis=-1)
    targets[:, -1] = IGNORE
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape)
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
            "positions": jnp.asarray(pos)}


def configs(frozen: dict, remat: bool | str = False) -> tuple[StepConfig, StepConfig, dict]:
    spec = resolve(LoraConfig.create(r=4, lora_alpha=8, init_lora_weights=False), CFG, ALL)
    lora = init_lora(spec, CFG, frozen)
    ours = StepConfig(model=CFG, lora=spec, remat=remat, loss_chunk=16)
    reference = StepConfig(model=CFG, lora=spec, remat=remat, loss_chunk=16,
                           linear_impl=Impl.REFERENCE)
    return ours, reference, lora


def dense_shapes() -> set[tuple[int, int]]:
    """(out, in) of every projection of one layer."""
    return {tuple(s.layer_shape) for s in decoder.param_specs(CFG) if is_projection(s)}


def saved_residual_shapes(cfg: StepConfig, lora: dict, frozen: dict, mb: dict) -> list[tuple]:
    """Shapes of what the backward of the loss keeps from its forward (jax's own account)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        jax.ad_checkpoint.print_saved_residuals(
            lambda lo: loss_sums(cfg, lo, frozen, mb, None)[0], lora)
    shapes = []
    for line in text.getvalue().splitlines():
        match = re.match(r"\s*\w+\[([\d,]*)\]", line)
        if match:
            shapes.append(tuple(int(d) for d in match.group(1).split(",") if d))
    return shapes


@pytest.mark.parametrize("kind,remat", [(QuantKind.NF4, False), (QuantKind.INT8, False),
                                        (QuantKind.NF4, "dots")])
def test_loss_and_lora_grads_equal_the_autodiff_reference(kind, remat):
    frozen = quantized_model(kind)
    ours, reference, lora = configs(frozen, remat)
    mb = micro_batch(2, 24, seed=int(np.random.default_rng().integers(1 << 30)))

    def value_and_grad(cfg):
        return jax.jit(jax.value_and_grad(lambda lo: loss_sums(cfg, lo, frozen, mb, None)[0]))(lora)

    (loss, grads), (ref_loss, ref_grads) = value_and_grad(ours), value_and_grad(reference)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        # bf16 compute: with remat, XLA fuses the two programs' recomputation differently
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * float(jnp.abs(want).max()))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_no_dense_weight_survives_to_the_backward():
    frozen = quantized_model(QuantKind.NF4)
    ours, reference, lora = configs(frozen)
    mb = micro_batch(2, 24, seed=0)
    dense = dense_shapes()

    def dense_residuals(cfg: StepConfig) -> list[tuple]:
        return [s for s in saved_residual_shapes(cfg, lora, frozen, mb) if s[-2:] in dense]

    assert dense_residuals(reference), "the reference should keep dense weights (test is blind)"
    assert dense_residuals(ours) == []


def test_compiled_temporaries_do_not_grow_with_the_dense_weights():
    """Weights large next to the activations: per extra layer the reference's temporaries grow by
    more than that layer's dense (bf16) weights, ours by well under half of them."""
    growth = {}
    for layers in (2, 4):
        config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=256,
                             intermediate_size=1024, num_layers=layers, num_heads=4,
                             num_kv_heads=2, head_dim=64)
        frozen = quantized_model(QuantKind.NF4, config)
        spec = resolve(LoraConfig.create(r=4, lora_alpha=8), config, ALL)
        lora = init_lora(spec, config, frozen)
        mb = micro_batch(1, 16, seed=0)
        mb["input_ids"] = mb["input_ids"] % config.vocab_size
        mb["targets"] = jnp.where(mb["targets"] == IGNORE, IGNORE,
                                  mb["targets"] % config.vocab_size)
        for impl in (None, Impl.REFERENCE):
            cfg = StepConfig(model=config, lora=spec, remat=False, loss_chunk=16,
                             linear_impl=impl)
            grad = jax.jit(jax.grad(lambda lo, fr: loss_sums(cfg, lo, fr, mb, None)[0]))
            temp = grad.lower(lora, frozen).compile().memory_analysis().temp_size_in_bytes
            growth[impl] = temp - growth.get(impl, 0)
    dense_per_layer = 2 * sum(int(np.prod(s.layer_shape)) for s in decoder.param_specs(config)
                              if is_projection(s))
    per_layer = {impl: g / 2 for impl, g in growth.items()}
    assert per_layer[Impl.REFERENCE] > dense_per_layer, (per_layer, dense_per_layer)
    assert per_layer[None] < 0.5 * dense_per_layer, (per_layer, dense_per_layer)
