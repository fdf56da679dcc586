"""Each kind of bad checkpoint gives its own clear FastLoRAError naming the file/key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastlora_jax import CheckpointError, ConfigError, FastLanguageModel, FastLoRAError
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint


def good(tmp_path, **kw):
    return write_checkpoint(tmp_path / "ckpt", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA), **kw)


def load(path):
    return FastLanguageModel.from_pretrained(path, dtype="float32")


def test_good_checkpoint_loads_single_and_sharded(tmp_path):
    a, _ = load(good(tmp_path))
    b, _ = load(write_checkpoint(tmp_path / "sharded", dict(TINY_LLAMA),
                                 llama_tensors(TINY_LLAMA), shards=3))
    ids = np.arange(10, dtype=np.int32).reshape(1, 10)
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tensors_load(tmp_path, dtype):
    import ml_dtypes

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    tensors = {k: v.astype(np_dtype) for k, v in llama_tensors(TINY_LLAMA).items()}
    model, _ = load(write_checkpoint(tmp_path / "half", dict(TINY_LLAMA), tensors))
    w = model.params()["layers"]["mlp"]["up_proj"]["weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(w[1]),
                                  tensors["model.layers.1.mlp.up_proj.weight"].astype(np.float32))


def expect(exc, path, *fragments):
    with pytest.raises(exc) as info:
        load(path)
    assert isinstance(info.value, FastLoRAError)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


def test_path_missing(tmp_path):
    expect(CheckpointError, tmp_path / "nope", "does not exist", "nope")


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    expect(CheckpointError, tmp_path / "f", "is a file")


def test_no_config_json(tmp_path):
    folder = good(tmp_path)
    (folder / "config.json").unlink()
    expect(CheckpointError, folder, "config.json", "is missing")


def test_config_not_json(tmp_path):
    folder = good(tmp_path)
    (folder / "config.json").write_text("{not json")
    expect(CheckpointError, folder, "config.json", "not valid JSON")


def test_unknown_model_type(tmp_path):
    folder = good(tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(TINY_LLAMA, model_type="bert")))
    err = expect(ConfigError, folder, "'bert'", "supported model_types", "llama")
    assert "config.json" in str(err)


def test_unknown_config_key(tmp_path):
    folder = good(tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(TINY_LLAMA, mystery_knob=3)))
    expect(ConfigError, folder, "'mystery_knob'", "config.json")


def test_unsupported_config_value(tmp_path):
    folder = good(tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(TINY_LLAMA, hidden_act="relu")))
    expect(ConfigError, folder, "'hidden_act'", "'relu'")


def test_missing_tensor(tmp_path):
    tensors = llama_tensors(TINY_LLAMA)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), tensors)
    expect(CheckpointError, folder, "lacks 1 tensor(s)", "'model.layers.1.mlp.down_proj.weight'")


def test_many_missing_tensors_are_named_and_counted(tmp_path):
    tensors = {k: v for k, v in llama_tensors(TINY_LLAMA).items()
               if "layers.1." not in k or "input_layernorm" in k}
    del tensors["model.norm.weight"]
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), tensors)
    err = expect(CheckpointError, folder, "lacks 9 tensor(s)",
                 "'model.layers.1.self_attn.q_proj.weight'", "and 1 more")
    assert str(err).count("'model.") == 8  # the first few by name, then how many more


@pytest.mark.parametrize("layers, fragment", [
    (4000, "no tensor of 3998 of them (layers [2, 3, 4, 5, 6, 7, 8, 9] …)"),  # checked before allocating
    (1, "holds layer 1 but config.json has num_hidden_layers=1")])
def test_layer_count_must_match_the_files(tmp_path, layers, fragment):
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA, num_hidden_layers=layers),
                              llama_tensors(TINY_LLAMA))
    expect(CheckpointError, folder, fragment)


def test_unexpected_tensor(tmp_path):
    tensors = llama_tensors(TINY_LLAMA)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), tensors)
    expect(CheckpointError, folder, "model.layers.0.self_attn.rotary_emb.inv_freq",
           "not a parameter")


def test_layer_beyond_config(tmp_path):
    tensors = llama_tensors(TINY_LLAMA)
    tensors["model.layers.7.input_layernorm.weight"] = np.ones(32, np.float32)
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), tensors)
    expect(CheckpointError, folder, "layer 7", "num_hidden_layers=2")


def test_wrong_shape(tmp_path):
    tensors = llama_tensors(TINY_LLAMA)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.ones((8, 32), np.float32)
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), tensors)
    expect(CheckpointError, folder, "model.layers.0.self_attn.k_proj.weight", "[8, 32]",
           "[16, 32]")


def test_wrong_dtype(tmp_path):
    tensors = llama_tensors(TINY_LLAMA)
    tensors["model.norm.weight"] = np.ones(32, np.int64)
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), tensors)
    expect(CheckpointError, folder, "model.norm.weight", "I64")


def test_truncated_safetensors(tmp_path):
    folder = good(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    expect(CheckpointError, folder, "model.safetensors", "truncated or corrupt")


def test_corrupt_safetensors_header(tmp_path):
    folder = good(tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:20] = b"#garbage#!!!"
    (folder / "model.safetensors").write_bytes(bytes(data))
    expect(CheckpointError, folder, "model.safetensors", "truncated or corrupt")


def test_index_names_missing_shard(tmp_path):
    folder = write_checkpoint(tmp_path / "c", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA),
                              shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    expect(CheckpointError, folder, "model-00002-of-00002.safetensors", "incomplete")


def test_pickle_only_checkpoint_refused(tmp_path):
    folder = good(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    expect(CheckpointError, folder, "pytorch_model.bin", "never unpickles", "save_pretrained")


def test_bad_dtype_argument(tmp_path):
    with pytest.raises(ConfigError, match="int32"):
        FastLanguageModel.from_pretrained(good(tmp_path), dtype="int32")
