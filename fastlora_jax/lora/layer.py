"""LoRA parameters (their own pytree), the adapted projection, and merging.

LoRA tree, beside the frozen tree and with the same paths (L = layers, r = the projection's max rank):
  layers.<group>.<name>.lora_A              [L, r, in]   float32 master weights
  layers.<group>.<name>.lora_B              [L, out, r]
  layers.<group>.<name>.lora_magnitude      [L, out]     DoRA only

Forward (PEFT's): y = W x + b + s * B A dropout(x); DoRA: with m / ||W + s B A||_row (norm not
differentiated) = g, y = W x + b + (g - 1) W x + g * s * B A dropout(x).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fastlora_jax import ops
from fastlora_jax.config import ModelConfig
from fastlora_jax.lora.spec import LoraSpec
from fastlora_jax.models.decoder import LINEAR_AXES, Params, Project

# Keys the forward adds next to the trainable arrays (never trained, never saved).
SCALE, DROPOUT_KEY = "scale", "dropout_key"


def dense(w: Any, dtype: Any = jnp.float32) -> jax.Array:
    """A frozen weight as a dense array (dequantized if it is a QTensor)."""
    from fastlora_jax.quant import QTensor, dequantize

    if isinstance(w, QTensor):
        return dequantize(w, dtype)
    return jnp.asarray(w, dtype)


def init_lora(spec: LoraSpec, model_config: ModelConfig, frozen: Params,
              dtype: Any = jnp.float32) -> Params:
    """Fresh LoRA params: A ~ kaiming_uniform(a=sqrt(5)) (U(±1/sqrt(in))), B = 0 (PEFT's default).

    init_lora_weights=False: B is drawn like A (U(±1/sqrt(r))), as PEFT leaves both at nn.Linear's
    init; "gaussian": A ~ N(0, 1/r). Entries beyond a layer's own rank are zero.
    """
    cfg = spec.config
    key = jax.random.key(cfg.random_state)
    tree: Params = {"layers": {}}
    for index, (module, ranks, scales) in enumerate(spec.modules):
        group, name = module
        w = frozen["layers"][group][name]["weight"]
        out_dim, in_dim = w.shape[-2:]  # QTensor.shape is the logical (out, in) too
        L, r = model_config.num_layers, max(ranks)
        ka, kb = jax.random.split(jax.random.fold_in(key, index))
        if cfg.init_lora_weights == "gaussian":
            a = jax.random.normal(ka, (L, r, in_dim)) / r
        else:
            a = jax.random.uniform(ka, (L, r, in_dim), minval=-1.0, maxval=1.0) / math.sqrt(in_dim)
        if cfg.init_lora_weights is False:
            b = jax.random.uniform(kb, (L, out_dim, r), minval=-1.0, maxval=1.0)
            b = b / jnp.sqrt(jnp.maximum(jnp.asarray(ranks, jnp.float32), 1.0))[:, None, None]
        else:
            b = jnp.zeros((L, out_dim, r))
        rank_mask = (jnp.arange(r)[None, :] < jnp.asarray(ranks)[:, None]).astype(jnp.float32)
        a = a * rank_mask[:, :, None]
        b = b * rank_mask[:, None, :]
        entry = {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}
        if cfg.use_dora:
            scale = jnp.asarray(scales, jnp.float32)[:, None, None]
            merged = dense(w) + scale * jnp.einsum("lor,lri->loi", b, a)
            entry["lora_magnitude"] = jnp.linalg.norm(merged, axis=-1).astype(dtype)
        tree["layers"].setdefault(group, {})[name] = entry
    return tree


def with_constants(lora: Params, spec: LoraSpec, dropout_key: jax.Array | None) -> Params:
    """The tree the forward scans: trainable arrays plus per-layer scale and dropout key."""
    out: Params = {"layers": {}}
    for index, ((group, name), _, scales) in enumerate(spec.modules):
        entry = dict(lora["layers"][group][name])
        entry[SCALE] = jnp.asarray(scales, jnp.float32)
        if dropout_key is not None:
            entry[DROPOUT_KEY] = jax.random.split(jax.random.fold_in(dropout_key, index),
                                                  len(scales))
        out["layers"].setdefault(group, {})[name] = entry
    return out


def lora_project(spec: LoraSpec, *, train: bool, linear_impl: Any = None) -> Project:
    """The projection used by the decoder when adapters are present; `linear_impl` picks the
    frozen matmul's implementation (`ops.Impl`; None = the measured default)."""
    cfg = spec.config
    rate = cfg.lora_dropout if train else 0.0

    def project(x: jax.Array, name: str, frozen: Params, lora: Params | None) -> jax.Array:
        axes = LINEAR_AXES.get(name)
        base = ops.linear(x, frozen["weight"], impl=linear_impl, axes=axes)
        bias = frozen.get("bias")
        if lora is None:
            return base if bias is None else base + bias.astype(base.dtype)
        xl = x
        if rate > 0.0 and DROPOUT_KEY in lora:
            keep = jax.random.bernoulli(lora[DROPOUT_KEY], 1.0 - rate, x.shape)
            xl = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        # In the compute dtype, like the frozen matmul (tensor cores accumulate in float32): a
        # float32 delta here would make the backward's dB and dh matmuls float32 ones.
        a = lora["lora_A"].astype(x.dtype)
        b = lora["lora_B"].astype(x.dtype)
        h = jnp.einsum("...i,ri->...r", xl, a)
        delta = jnp.einsum("...r,or->...o", h, b) * lora[SCALE].astype(x.dtype)
        if "lora_magnitude" in lora:
            w = dense(frozen["weight"])
            merged = w + lora[SCALE] * (lora["lora_B"].astype(jnp.float32)
                                        @ lora["lora_A"].astype(jnp.float32))
            norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=-1))
            g = lora["lora_magnitude"].astype(jnp.float32) / norm             # [out]
            base_for_dora = (base if xl is x else
                             ops.linear(xl, frozen["weight"], impl=linear_impl, axes=axes))
            y = (base.astype(jnp.float32) + (g - 1.0) * base_for_dora.astype(jnp.float32)
                 + g * delta.astype(jnp.float32)).astype(x.dtype)
        else:
            y = base + delta
        return y if bias is None else y + bias.astype(y.dtype)

    return project


def merge_weight(w: Any, entry: Params, scale: jax.Array) -> jax.Array:
    """One projection with its adapter folded in, in float32: W + s B A (DoRA: each row rescaled
    to the magnitude m, g = m / ||W + s B A||_row).

    w: [..., out, in] (array or QTensor); entry: this projection's LoRA arrays with the same
    leading axes (lora_A [..., r, in], lora_B [..., out, r], lora_magnitude [..., out]);
    scale: [...]. Works on the stacked [L, ...] arrays and on one layer's slice alike.
    """
    w = dense(w) + scale[..., None, None] * jnp.matmul(entry["lora_B"].astype(jnp.float32),
                                                      entry["lora_A"].astype(jnp.float32))
    if "lora_magnitude" in entry:
        g = entry["lora_magnitude"].astype(jnp.float32) / jnp.linalg.norm(w, axis=-1)
        w = w * g[..., None]
    return w


def merge(frozen: Params, lora: Params | None, spec: LoraSpec | None, dtype: Any) -> Params:
    """Frozen params with every adapter folded in: W' = W + s B A (DoRA: g * (W + s B A)).

    Quantized weights are dequantized to `dtype`, and so are the adapted ones; without adapters
    (`lora` / `spec` None) the result is the frozen params with their quantized weights dense.
    """
    merged = jax.tree.map(lambda x: x, frozen, is_leaf=lambda x: hasattr(x, "codes"))
    layers = merged["layers"]
    for (group, name), _, scales in (spec.modules if lora is not None else ()):
        w = merge_weight(frozen["layers"][group][name]["weight"], lora["layers"][group][name],
                         jnp.asarray(scales, jnp.float32))
        layers[group][name] = dict(layers[group][name], weight=w.astype(dtype))
    for group, modules in layers.items():
        for name, sub in list(modules.items()):
            if isinstance(sub, dict) and hasattr(sub.get("weight"), "codes"):
                modules[name] = dict(sub, weight=dense(sub["weight"], dtype))
    return merged
