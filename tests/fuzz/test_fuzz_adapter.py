"""Fuzzed PEFT adapters: adapter_config.json (see tests/fuzz/common.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlora_jax import FastLanguageModel
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint
from tests.fuzz.common import (CASES, FUZZ, Counter, cli_error, entries, fresh_dir, json_values,
                               outcome)

PEFT_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
             "rank_pattern", "alpha_pattern", "init_lora_weights", "peft_type", "bias",
             "base_model_name_or_path", "fan_in_fan_out", "modules_to_save", "lora_bias",
             "layers_to_transform", "task_type"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(the tiny Llama's folder, a valid adapter folder for it, its adapter_config dict)."""
    root = tmp_path_factory.mktemp("adapter")
    folder = write_checkpoint(root / "base", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))
    model, _ = FastLanguageModel.from_pretrained(folder, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=2, target_modules=["q_proj", "v_proj"],
                                             rank_pattern={"v_proj": 3})
    model.save_pretrained(root / "adapter")
    return folder, root / "adapter", json.loads((root / "adapter" / "adapter_config.json").read_text())


@st.composite
def adapter_configs(draw, valid):
    kind = draw(st.sampled_from(["edit", "edit", "edit", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    config = dict(valid)
    for key in draw(st.lists(st.sampled_from(PEFT_KEYS), unique=True, max_size=3)):
        if draw(st.booleans()) and key in config:
            del config[key]
        else:
            config[key] = draw(json_values | st.integers(-2, 10 ** 7) | st.sampled_from(
                ["q_proj", "(", ".*", "[a-", "lm_head", "LORA", "all-linear"])
                | st.lists(st.sampled_from(["q_proj", "k_proj", "x", "("]), max_size=3)
                | st.dictionaries(st.sampled_from(["q_proj", "(", "v_proj", "1"]),
                                  st.integers(-1, 10 ** 6) | json_values, max_size=2))
    return json.dumps(config).encode()


def test_adapter_config_json(base, tmp_path):
    model_dir, adapter, valid = base
    count = Counter()
    model, _ = FastLanguageModel.from_pretrained(model_dir, dtype="float32")

    @FUZZ
    @given(adapter_configs(valid))
    def case(text):
        folder = fresh_dir(tmp_path)
        (folder / "adapter_config.json").write_bytes(text)
        (folder / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
        error = outcome(lambda: model.load_adapter(folder))
        count.add(error)
        out = folder / "export"
        if error is not None:  # the CLI says the same, and writes nothing
            cli_error(["export", "--model", str(model_dir), "--adapter", str(folder),
                       "--output_dir", str(out), "--method", "peft"])
            assert entries(folder) == ["adapter_config.json", "adapter_model.safetensors"]
        shutil.rmtree(folder)

    case()
    assert count.seen == CASES and count.failed >= CASES // 2, vars(count)
