"""ModelConfig: strict parsing of both rope dialects and the inverse `config_to_hf`."""

from __future__ import annotations

import pytest

from fastlora_jax import ConfigError
from fastlora_jax.config import HARMLESS_KEYS, RopeKind
from fastlora_jax.models.registry import config_from_hf, config_to_hf
from tests.checkpoints import TINY_LLAMA

LLAMA31 = dict(TINY_LLAMA, rope_theta=500000.0, rope_scaling={
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"})


def test_v4_and_v5_dialects_parse_to_the_same_config():
    v4 = config_from_hf(LLAMA31)
    v5_dict = {k: v for k, v in LLAMA31.items() if k not in ("rope_theta", "rope_scaling")}
    v5_dict["rope_parameters"] = dict(LLAMA31["rope_scaling"], rope_theta=500000.0)
    assert config_from_hf(v5_dict) == v4
    assert v4.rope.kind is RopeKind.LLAMA3 and v4.rope.theta == 500000.0


def test_legacy_type_spelling():
    cfg = dict(TINY_LLAMA, rope_scaling={"type": "linear", "factor": 2.0})
    assert config_from_hf(cfg).rope.kind is RopeKind.LINEAR


@pytest.mark.parametrize("hf", [TINY_LLAMA, LLAMA31, dict(TINY_LLAMA, tie_word_embeddings=True,
                                                         head_dim=16, attention_bias=True)])
def test_round_trip(hf):
    cfg = config_from_hf(hf)
    again = config_from_hf(config_to_hf(cfg))
    assert again == cfg
    out = config_to_hf(cfg)
    assert out["architectures"] == ["LlamaForCausalLM"] and out["model_type"] == "llama"
    assert out["torch_dtype"] == "float32"  # harmless keys are kept verbatim


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'use_magic'"):
        config_from_hf(dict(TINY_LLAMA, use_magic=True))


def test_unknown_rope_key_is_named():
    with pytest.raises(ConfigError, match="'beta_fast'"):
        config_from_hf(dict(TINY_LLAMA, rope_scaling={"rope_type": "linear",
                                                                  "factor": 2.0, "beta_fast": 3}))


def test_unsupported_rope_type():
    with pytest.raises(ConfigError, match="'yarn'"):
        config_from_hf(dict(TINY_LLAMA, rope_scaling={"rope_type": "yarn",
                                                                  "factor": 2.0}))


def test_llama3_needs_its_parameters():
    with pytest.raises(ConfigError, match="low_freq_factor"):
        config_from_hf(dict(TINY_LLAMA, rope_scaling={"rope_type": "llama3",
                                                                  "factor": 8.0}))


def test_wrong_type_and_missing_required():
    with pytest.raises(ConfigError, match="'hidden_size' must be a int"):
        config_from_hf(dict(TINY_LLAMA, hidden_size="32"))
    cfg = dict(TINY_LLAMA)
    del cfg["vocab_size"]
    with pytest.raises(ConfigError, match="'vocab_size' is missing"):
        config_from_hf(cfg)


def test_heads_must_divide():
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        config_from_hf(dict(TINY_LLAMA, num_key_value_heads=3))


def test_both_dialects_at_once_is_an_error():
    with pytest.raises(ConfigError, match="both"):
        config_from_hf(dict(LLAMA31, rope_parameters={"rope_type": "default"}))


def test_allow_list_is_documented_and_harmless():
    assert "bos_token_id" in HARMLESS_KEYS and "hidden_size" not in HARMLESS_KEYS


def test_layer_count_is_bounded_before_any_per_layer_list_is_built():
    for layers in (0, -1, 10 ** 12):
        with pytest.raises(ConfigError, match=f"num_hidden_layers={layers} must be between 1"):
            config_from_hf(dict(TINY_LLAMA, model_type="gemma2", num_hidden_layers=layers))
