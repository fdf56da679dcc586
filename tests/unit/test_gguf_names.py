"""GGUF names, layouts and metadata: both directions on every family's released config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fastlora_jax import ModelConfig
from fastlora_jax.config import RopeKind
from fastlora_jax.converters import gguf_names as gn
from fastlora_jax.errors import ExportError
from fastlora_jax.models.decoder import param_specs
from fastlora_jax.models.rope import longrope_attention_factor
from fastlora_jax.models.registry import config_from_hf
from tests.unit.test_families import REAL

LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                  hidden_act="silu", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
EXPORTABLE = {k: v for k, v in REAL.items() if k != "gemma"}  # Gemma 7B: hidden_act "gelu" ok
CONFIGS = dict(EXPORTABLE, gemma=REAL["gemma"], llama31=LLAMA31_8B)


def _config(hf: dict) -> ModelConfig:
    return config_from_hf(hf)


def _math(c: ModelConfig) -> ModelConfig:
    """The fields that change the forward pass (extras and token ids dropped)."""
    return dataclasses.replace(c, extras=())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_parameter_name_round_trips_and_is_a_gguf_name(name):
    import gguf

    cfg = _config(CONFIGS[name])
    arch = gn.gguf_arch(cfg)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]}
    seen = set()
    for spec in param_specs(cfg):
        for layer in (range(2) if spec.stacked else [None]):
            name_ = gn.gguf_tensor_name(cfg, spec.path, layer)
            assert name_ not in seen
            seen.add(name_)
            assert gn.param_from_gguf_name(cfg, name_) == (spec.path, layer)
            template = name_.rsplit(".", 1)[0].replace(f"blk.{layer}.", "blk.{bid}.")
            assert template in known, (name_, arch)


def test_llama_rope_permutation_interleaves_the_halves_of_each_head():
    cfg = _config(dict(LLAMA31_8B, num_attention_heads=4, num_key_value_heads=2, hidden_size=32))
    d = cfg.head_dim
    rows = np.arange(cfg.q_size, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    out = gn.to_gguf_layout(cfg, ("layers", "self_attn", "q_proj", "weight"), rows)
    for h in range(cfg.num_heads):
        for i in range(d // 2):
            assert out[h * d + 2 * i, 0] == h * d + i
            assert out[h * d + 2 * i + 1, 0] == h * d + i + d // 2
    k = np.random.default_rng(0).normal(size=(cfg.kv_size,)).astype(np.float32)
    path = ("layers", "self_attn", "k_proj", "bias")
    assert np.array_equal(gn.from_gguf_layout(cfg, path, gn.to_gguf_layout(cfg, path, k)), k)
    assert not np.array_equal(gn.to_gguf_layout(cfg, path, k), k)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen2", "phi3"])
def test_neox_architectures_keep_hf_rows_and_gemma_norms_gain_one(name):
    cfg = _config(CONFIGS[name])
    x = np.random.default_rng(1).normal(size=(cfg.q_size, 4)).astype(np.float32)
    proj = ("layers", "self_attn", "qkv_proj" if cfg.fused_qkv else "q_proj", "weight")
    assert np.array_equal(gn.to_gguf_layout(cfg, proj, x), x)
    norm = np.random.default_rng(2).normal(size=(cfg.hidden_size,)).astype(np.float32)
    for path in (("norm", "weight"), ("layers", "input_layernorm", "weight")):
        stored = gn.to_gguf_layout(cfg, path, norm)
        assert np.allclose(stored, norm + cfg.norm_offset)
        assert np.allclose(gn.from_gguf_layout(cfg, path, stored), norm, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_metadata_round_trips_to_the_same_model(name):
    cfg = _config(CONFIGS[name])
    if cfg.rope.kind is RopeKind.LLAMA3:
        tensors = gn.rope_tensors(cfg)
        assert set(tensors) == {gn.ROPE_FREQS} and tensors[gn.ROPE_FREQS].shape == (64,)
        # llama.cpp's converter values: 1 for short wavelengths, the factor for long ones
        assert tensors[gn.ROPE_FREQS][0] == 1.0 and tensors[gn.ROPE_FREQS][-1] == 8.0
        return
    meta = gn.to_gguf_metadata(cfg)
    arch = gn.gguf_arch(cfg)
    assert all(k.startswith(arch + ".") for k in meta)
    names = {gn.gguf_tensor_name(cfg, s.path, 0 if s.stacked else None) for s in param_specs(cfg)}
    hf = gn.hf_config_from_gguf(arch, meta, names, gn.rope_tensors(cfg) or None)
    back = config_from_hf(hf)
    want = cfg
    if cfg.model_type == "mistral":  # llama.cpp runs Mistral as llama, without the window
        want = dataclasses.replace(cfg, model_type="llama", sliding_window=None)
    if cfg.model_type in ("qwen2", "qwen3"):  # llama.cpp's qwen archs never slide
        want = dataclasses.replace(want, layer_types=back.layer_types)
    if cfg.rope.kind is RopeKind.LONGROPE:  # explicit attention factor, float32 factors
        f32 = lambda v: tuple(float(x) for x in np.float32(v))  # noqa: E731
        assert back.rope.attention_factor == pytest.approx(longrope_attention_factor(cfg))
        want = dataclasses.replace(want, rope=dataclasses.replace(
            cfg.rope, attention_factor=back.rope.attention_factor, factor=back.rope.factor,
            short_factor=f32(cfg.rope.short_factor), long_factor=f32(cfg.rope.long_factor)))
    assert _math(back) == _math(want)


def test_what_llama_cpp_cannot_run_is_refused_naming_the_field():
    base = dict(REAL["gemma2"], num_hidden_layers=4)
    with pytest.raises(ExportError, match="attention scale"):
        gn.check_exportable(_config(dict(base, query_pre_attn_scalar=100)))
    with pytest.raises(ExportError, match="tie_word_embeddings"):
        gn.check_exportable(_config(dict(base, tie_word_embeddings=False)))
    with pytest.raises(ExportError, match="soft-caps"):
        gn.check_exportable(_config(dict(base, final_logit_softcapping=None)))
    with pytest.raises(ExportError, match="biases on"):
        gn.check_exportable(_config(dict(REAL["qwen3"], attention_bias=True)))
    dynamic = dict(LLAMA31_8B, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ExportError, match="dynamic"):
        gn.check_exportable(_config(dynamic))
