"""The family table: config.json of each family parses strictly, round-trips, and sets its quirks."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ConfigError, FastLanguageModel, ModelConfig
from fastlora_jax.config import Activation, RopeKind
from fastlora_jax.lora.layer import init_lora
from fastlora_jax.lora.spec import LoraConfig, projections, resolve
from fastlora_jax.models import causal_lm, decoder
from fastlora_jax.models.registry import FAMILIES, config_from_hf, config_to_hf, family_for
from fastlora_jax.models.rope import longrope_attention_factor
from tests.checkpoints import TINY_LLAMA

COMMON = dict(bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", use_cache=True,
              transformers_version="4.44.0", initializer_range=0.02, attention_dropout=0.0)

# Shaped like the released config.json files (sizes shrunk where they do not matter).
MISTRAL_7B = dict(COMMON, model_type="mistral", architectures=["MistralForCausalLM"],
                  vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False)
GEMMA_7B = dict(COMMON, model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=256000,
                hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu",
                hidden_activation=None, max_position_embeddings=8192, rms_norm_eps=1e-6,
                rope_theta=10000.0, rope_scaling=None, attention_bias=False, pad_token_id=0)
GEMMA2_9B = dict(COMMON, model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                 vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                 num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, hidden_act="gelu_pytorch_tanh",
                 hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                 sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 cache_implementation="hybrid", max_position_embeddings=8192, rms_norm_eps=1e-6,
                 rope_theta=10000.0, attention_bias=False, pad_token_id=0)
PHI3_MINI_4K = dict(COMMON, model_type="phi3", architectures=["Phi3ForCausalLM"],
                    auto_map={"AutoConfig": "configuration_phi3.Phi3Config"}, vocab_size=32064,
                    hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                    max_position_embeddings=4096, original_max_position_embeddings=4096,
                    rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, sliding_window=2047,
                    embd_pdrop=0.0, resid_pdrop=0.0, attention_bias=False, pad_token_id=32000,
                    tie_word_embeddings=False)
PHI35_MINI = dict(PHI3_MINI_4K, max_position_embeddings=131072, sliding_window=262144,
                  rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 48 for i in range(48)],
                                "long_factor": [1.5 + i for i in range(48)]})
PHI3_MEDIUM_128K = dict(PHI3_MINI_4K, hidden_size=5120, intermediate_size=17920,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                        max_position_embeddings=131072, sliding_window=131072,
                        rope_scaling={"type": "su", "short_factor": [1.0] * 64,
                                      "long_factor": [1.0 + i / 8 for i in range(64)]})
QWEN25_7B = dict(COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064,
                 hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 rope_scaling=None, sliding_window=131072, use_sliding_window=False,
                 max_window_layers=28, tie_word_embeddings=False)
QWEN3_8B = dict(COMMON, model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                rope_scaling=None, sliding_window=None, use_sliding_window=False,
                max_window_layers=36, attention_bias=False, tie_word_embeddings=False)
GEMMA3_270M = dict(  # as transformers 5 writes it (built by scripts/build_gemma3.py)
    COMMON, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], _sliding_window_pattern=6,
    attention_bias=False, attn_logit_softcapping=None, final_logit_softcapping=None, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", hidden_size=640, intermediate_size=2048,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    max_position_embeddings=32768, num_attention_heads=4, num_hidden_layers=18,
    num_key_value_heads=1, query_pre_attn_scalar=256, rms_norm_eps=1e-6, sliding_window=512,
    rope_parameters={"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
    tie_word_embeddings=True, use_bidirectional_attention=False, vocab_size=262144)
GEMMA3_4B_TEXT_V4 = dict(  # the v4 dialect: rope_local_base_freq, pattern, global-only scaling
    COMMON, model_type="gemma3_text", hidden_size=2560, intermediate_size=10240,
    num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=1024,
    sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0}, vocab_size=262208,
    max_position_embeddings=131072, rms_norm_eps=1e-6)

REAL = {"mistral": MISTRAL_7B, "gemma": GEMMA_7B, "gemma2": GEMMA2_9B, "phi3": PHI3_MINI_4K,
        "phi3.5": PHI35_MINI, "phi3_medium": PHI3_MEDIUM_128K, "qwen2": QWEN25_7B, "qwen3": QWEN3_8B, "gemma3": GEMMA3_270M,
        "gemma3_v4": GEMMA3_4B_TEXT_V4}


@pytest.mark.parametrize("name", sorted(REAL))
def test_released_configs_parse_and_round_trip(name):
    cfg = config_from_hf(REAL[name])
    out = config_to_hf(cfg)
    assert config_from_hf(out) == cfg
    assert out["model_type"] == REAL[name]["model_type"]
    assert out["architectures"] == [family_for(cfg.model_type).architecture]
    assert out["torch_dtype"] == "bfloat16"  # harmless keys are kept verbatim


def test_mistral_slides_every_layer_and_null_means_full():
    cfg = config_from_hf(MISTRAL_7B)
    assert [cfg.layer_window(i) for i in (0, 31)] == [4096, 4096]
    assert config_from_hf(dict(MISTRAL_7B, sliding_window=None)).layer_window(0) is None
    absent = {k: v for k, v in MISTRAL_7B.items() if k != "sliding_window"}
    assert config_from_hf(absent).sliding_window == 4096  # MistralConfig's default


def test_gemma_quirks():
    cfg = config_from_hf(GEMMA_7B)
    assert cfg.norm_offset == 1.0 and cfg.embed_scale == pytest.approx(math.sqrt(3072))
    assert cfg.mlp_activation is Activation.GELU_TANH  # legacy "gelu" means tanh-GELU
    assert cfg.tie_embeddings and cfg.head_dim == 256 and cfg.q_size == 4096 != cfg.hidden_size
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        config_from_hf(dict(GEMMA_7B, use_bidirectional_attention=True))


def test_gemma2_quirks():
    cfg = config_from_hf(GEMMA2_9B)
    assert cfg.post_norms and cfg.attn_logit_softcap == 50.0 and cfg.final_logit_softcap == 30.0
    assert cfg.attention_scale == 256 ** -0.5
    assert [cfg.layer_window(i) for i in range(4)] == [4096, None, 4096, None]
    assert decoder.layer_segments(cfg) == ((0, 42, 2),)
    with pytest.raises(ConfigError, match="hidden_activation"):  # exact GELU is another model
        config_from_hf(dict(GEMMA2_9B, hidden_activation="gelu"))


def test_gemma3_layer_types_and_ropes():
    cfg = config_from_hf(GEMMA3_270M)
    assert cfg.qk_norm and cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None
    assert decoder.layer_segments(cfg) == ((0, 18, 6),)
    one_b = config_from_hf(dict(GEMMA3_270M, num_hidden_layers=26, layer_types=(
        ["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2))
    assert decoder.layer_segments(one_b) == ((0, 24, 6), (24, 26, 1))  # Gemma 3 1B: 26 layers
    assert cfg.layer_rope(0).theta == 10000.0 and cfg.layer_rope(5).theta == 1000000.0
    v4 = config_from_hf(GEMMA3_4B_TEXT_V4)
    assert v4.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert v4.rope.kind is RopeKind.LINEAR and v4.rope.factor == 8.0  # global layers only
    assert v4.local_rope.kind is RopeKind.DEFAULT and v4.local_rope.theta == 10000.0
    # the same model in the v5 dialect
    v5 = {k: v for k, v in GEMMA3_4B_TEXT_V4.items()
          if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert config_from_hf(v5) == v4


def test_phi3_fused_projections_and_longrope():
    cfg = config_from_hf(PHI3_MINI_4K)
    assert cfg.fused_qkv and cfg.fused_gate_up and cfg.layer_window(0) == 2047
    shapes = {s.path: s.layer_shape for s in decoder.param_specs(cfg)}
    assert shapes[("layers", "self_attn", "qkv_proj", "weight")] == (3 * 3072, 3072)
    assert shapes[("layers", "mlp", "gate_up_proj", "weight")] == (2 * 8192, 3072)
    assert ("layers", "self_attn", "q_proj", "weight") not in shapes
    long = config_from_hf(PHI35_MINI)
    assert long.rope.kind is RopeKind.LONGROPE and long.rope.original_max_position_embeddings == 4096
    assert longrope_attention_factor(long) == pytest.approx(
        math.sqrt(1 + math.log(32) / math.log(4096)))
    medium = config_from_hf(PHI3_MEDIUM_128K)  # GQA inside the fused qkv_proj
    assert medium.rope.kind is RopeKind.LONGROPE and medium.head_dim == 128
    assert {s.path: s.layer_shape for s in decoder.param_specs(medium)}[
        ("layers", "self_attn", "qkv_proj", "weight")] == (40 * 128 + 2 * 10 * 128, 5120)
    with pytest.raises(ConfigError, match="short_factor must have rotary_dim/2 = 48"):
        config_from_hf(dict(PHI35_MINI, rope_scaling=dict(
            PHI35_MINI["rope_scaling"], short_factor=[1.0] * 47)))


def test_qwen_windows_and_biases():
    cfg = config_from_hf(QWEN25_7B)
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None  # use_sliding_window off
    on = config_from_hf(dict(QWEN25_7B, use_sliding_window=True, sliding_window=4096,
                                         max_window_layers=20))
    assert [on.layer_window(i) for i in (19, 20, 27)] == [None, 4096, 4096]
    assert decoder.layer_segments(on) == ((0, 20, 1), (20, 28, 1))
    assert decoder.layer_segments(cfg) == ((0, 28, 1),)
    q3 = config_from_hf(QWEN3_8B)
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 128


def test_default_lora_targets_per_family():
    """Unsloth's default (every projection of the family); Phi-3's are its fused PEFT names."""
    by_type = {hf["model_type"]: hf for hf in REAL.values()}
    by_type["llama"] = TINY_LLAMA
    assert set(by_type) == set(FAMILIES)
    for family in FAMILIES.values():
        cfg = config_from_hf(by_type[family.model_type])
        assert sorted(family.default_target_modules) == sorted(n for _, n in projections(cfg))
        spec = resolve(LoraConfig(), cfg, family.default_target_modules)
        assert {n for _, n in spec.targets} == set(family.default_target_modules)
    assert FAMILIES["phi3"].default_target_modules == ("qkv_proj", "o_proj", "gate_up_proj",
                                                        "down_proj")
    assert FAMILIES["phi3"].peft_default_target_modules is None  # PEFT has no phi3 entry


def test_llama_target_names_on_phi3_list_the_fused_ones():
    cfg = config_from_hf(PHI3_MINI_4K)
    with pytest.raises(ConfigError, match="'gate_up_proj'.*'qkv_proj'"):
        resolve(LoraConfig(target_modules=("q_proj", "v_proj")), cfg, ())


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ConfigError) as err:
        config_from_hf(dict(MISTRAL_7B, model_type="falcon"))
    message = str(err.value)
    assert "'falcon' is not a supported model family" in message
    for model_type in ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "qwen2",
                       "qwen3"):
        assert repr(model_type) in message


def test_unsupported_checkpoint_fails_naming_the_file_and_the_supported_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(MISTRAL_7B, model_type="mamba")))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'mamba' is not a supported "
                                          r"model family; supported model_types: \[.*'phi3'"):
        FastLanguageModel.from_pretrained(tmp_path)


def test_family_allow_lists_are_per_family():
    assert config_from_hf(PHI3_MINI_4K)  # auto_map is harmless for phi3 ...
    with pytest.raises(ConfigError, match="'auto_map'"):  # ... and not understood elsewhere
        config_from_hf(dict(QWEN25_7B, auto_map={"AutoConfig": "x.Y"}))
    with pytest.raises(ConfigError, match="'resid_pdrop'"):
        config_from_hf(dict(PHI3_MINI_4K, resid_pdrop=0.1))
    with pytest.raises(ConfigError, match="'use_magic'"):
        config_from_hf(dict(GEMMA2_9B, use_magic=1))
    with pytest.raises(ConfigError, match="layer_types holds"):
        config_from_hf(dict(GEMMA2_9B, num_hidden_layers=2,
                                        layer_types=["sliding_attention", "chunked_attention"]))


def test_fused_forward_equals_unfused_forward():
    """Phi-3's fused tree computes exactly what the same weights split into q/k/v, gate/up do."""
    fused = ModelConfig(model_type="phi3", vocab_size=50, hidden_size=32, intermediate_size=40,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, fused_qkv=True,
                        fused_gate_up=True)
    split = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=40,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    p = decoder.init_params(fused, jax.random.key(0))
    attn, mlp = p["layers"]["self_attn"], p["layers"]["mlp"]
    q, k, v = jnp.split(attn["qkv_proj"]["weight"], [32, 48], axis=1)
    gate, up = jnp.split(mlp["gate_up_proj"]["weight"], 2, axis=1)
    s = {**p, "layers": {**p["layers"],
                         "self_attn": {"q_proj": {"weight": q}, "k_proj": {"weight": k},
                                       "v_proj": {"weight": v}, "o_proj": attn["o_proj"]},
                         "mlp": {"gate_proj": {"weight": gate}, "up_proj": {"weight": up},
                                 "down_proj": mlp["down_proj"]}}}
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 50)
    np.testing.assert_allclose(np.asarray(decoder.forward(fused, p, ids)),
                               np.asarray(decoder.forward(split, s, ids)), atol=1e-6)


def test_gemma_embedding_scale_is_rounded_to_the_compute_dtype():
    """As transformers: sqrt(3072) = 55.4256 becomes 55.5 in bfloat16 before multiplying."""
    cfg = config_from_hf(dict(GEMMA_7B, vocab_size=8, num_hidden_layers=1))
    w = jax.random.normal(jax.random.key(0), (8, 3072))
    h = decoder.embed(cfg, {"embed_tokens": {"weight": w}}, jnp.arange(8)[None], jnp.bfloat16)
    assert float(jnp.asarray(cfg.embed_scale, jnp.bfloat16)) == 55.5
    np.testing.assert_array_equal(np.asarray(h[0], np.float32), np.asarray(
        w.astype(jnp.bfloat16) * jnp.bfloat16(55.5), np.float32))


def _tiny(cfg: ModelConfig) -> ModelConfig:
    """The same family and quirks at toy size: 2 layers, one of each layer type it has."""
    types = cfg.layer_types
    if types is not None:
        types = tuple(sorted(set(types), reverse=True)) * (2 // len(set(types)))
    return dataclasses.replace(
        cfg, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, layer_types=types,
        sliding_window=None if cfg.sliding_window is None else 3,
        embed_scale=None if cfg.embed_scale is None else 32 ** 0.5)


@pytest.mark.parametrize("name", ["gemma3", "phi3", "qwen3"])  # every kind of block between them
def test_every_adapter_of_every_family_trains(name):
    """Gradients of the next-token loss reach every LoRA array (default targets: Phi-3's fused
    ones too), through post-norms, q/k norms and per-layer ropes, and a step lowers the loss."""
    cfg = _tiny(config_from_hf(REAL[name]))
    frozen = decoder.init_params(cfg, jax.random.key(0))
    frozen = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape),
                          frozen)  # non-trivial norms (Gemma's start at 0 = identity)
    spec = resolve(LoraConfig(r=4, init_lora_weights=False), cfg,
                   family_for(cfg.model_type).default_target_modules)
    lora = init_lora(spec, cfg, frozen)
    ids = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)

    def loss(l):
        logits = causal_lm.forward(cfg, spec, frozen, l, ids[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(lora)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 2 * len(family_for(cfg.model_type).default_target_modules)
    for path, g in leaves:
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, path
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, lora, grads)
    assert float(value_and_grad(stepped)[0]) < float(value)
