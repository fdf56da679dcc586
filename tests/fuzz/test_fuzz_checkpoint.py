"""Fuzzed model checkpoints: safetensors headers and config.json (see tests/fuzz/common.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save

from fastlora_jax import FastLanguageModel
from tests.checkpoints import TINY_LLAMA, llama_tensors
from tests.unit.test_families import REAL
from tests.fuzz.common import (CASES, FUZZ, Counter, cli_error, entries, fresh_dir, json_values,
                               outcome)

TENSORS = llama_tensors(TINY_LLAMA)
NAMES = sorted(TENSORS)
VALID = save(TENSORS, metadata={"format": "pt"})
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "U64", "X"]


@st.composite
def built_headers(draw):
    """A header written from parts: real or invented names, any dtype, shapes and offsets that
    may or may not agree with each other and with the data that follows."""
    keep = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    names = keep + draw(st.lists(st.text(max_size=40), max_size=3))
    header, offset = {}, 0
    for name in names:
        real = TENSORS.get(name)
        dtype = draw(st.sampled_from(["F32"] * 6 + DTYPES) | st.text(max_size=4))
        shape = draw(st.just(list(real.shape) if real is not None else [2])
                     | st.lists(st.integers(-2, 2 ** 62), max_size=4))
        size = 4 * int(np.prod(shape)) if shape and all(0 <= s < 2 ** 20 for s in shape) else 4
        start, end = draw(st.sampled_from(["tight", "any"])) == "tight" and (offset, offset + size) \
            or (draw(st.integers(-1, 4096)), draw(st.integers(-1, 4096)))
        offset = max(offset, end if isinstance(end, int) else 0)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        header[name] = draw(st.just(entry) | json_values)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | json_values)
    text = json.dumps(header).encode()
    length = draw(st.just(len(text)) | st.integers(0, 2 ** 64 - 1))
    data = draw(st.binary(max_size=64)) if offset > 4096 else bytes(max(offset, 0))
    return length.to_bytes(8, "little") + text + data[:draw(st.integers(0, len(data)))] \
        if draw(st.integers(0, 9)) == 0 else length.to_bytes(8, "little") + text + data


@st.composite
def mutated_files(draw):
    """The valid file with a few header bytes changed, or cut short."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, HEADER_END - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def test_safetensors_headers(tmp_path):
    count = Counter()

    @FUZZ
    @given(st.one_of(built_headers(), mutated_files(), st.binary(max_size=200)))
    def case(blob):
        folder = fresh_dir(tmp_path)
        (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
        (folder / "model.safetensors").write_bytes(blob)
        error = outcome(lambda: FastLanguageModel.from_pretrained(folder, dtype="float32"))
        count.add(error)
        cli_error(["chat", "--model", str(folder)])  # a loaded model has no tokenizer: an error too
        assert entries(folder) == ["config.json", "model.safetensors"]  # nothing written
        shutil.rmtree(folder)

    case()
    assert count.seen == CASES and count.failed >= CASES * 9 // 10, vars(count)


ROPE = st.fixed_dictionaries({"rope_type": st.sampled_from(
    ["default", "linear", "dynamic", "llama3", "longrope", "su", "yarn", "x"])}, optional={
    k: json_values | st.floats(-2, 1e6) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
        "short_factor", "long_factor", "attention_factor", "rope_theta")})


@st.composite
def configs(draw):
    """config.json text: a real family's config (or the tiny Llama's, which matches the weights)
    with keys changed, dropped or added, or anything at all."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=100))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    config = dict(draw(st.sampled_from([TINY_LLAMA] * 4 + [REAL[k] for k in sorted(REAL)])))
    for key in draw(st.lists(st.sampled_from(sorted(config)), unique=True, max_size=3)):
        if draw(st.booleans()):
            del config[key]
        else:
            config[key] = draw(json_values | st.integers(-3, 300) | st.just(10 ** 9))
    config.update(draw(st.dictionaries(st.sampled_from(
        ["rope_scaling", "rope_parameters", "head_dim", "sliding_window", "layer_types",
         "attention_bias", "mlp_bias", "tie_word_embeddings", "rope_theta", "mystery",
         "rope_local_base_freq", "query_pre_attn_scalar", "final_logit_softcapping",
         "partial_rotary_factor", "quantization_config"]), json_values | ROPE, max_size=2)))
    return json.dumps(config).encode()


def test_config_json(tmp_path):
    count = Counter()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(VALID)

    @FUZZ
    @given(configs())
    def case(text):
        folder = fresh_dir(tmp_path)
        (folder / "config.json").write_bytes(text)
        (folder / "model.safetensors").symlink_to(weights)
        error = outcome(lambda: FastLanguageModel.from_pretrained(folder, dtype="float32"))
        count.add(error)
        cli_error(["chat", "--model", str(folder)])
        assert entries(folder) == ["config.json", "model.safetensors"]
        shutil.rmtree(folder)

    case()
    assert count.seen == CASES and count.failed >= CASES // 2, vars(count)
