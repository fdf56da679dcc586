"""Our GGUF writer's bulk metadata packing writes the `gguf` package writer's bytes, and our
merges spelling equals the package's conversion."""

from __future__ import annotations

import json
import pathlib

import gguf
import pytest

from fastlora_jax.converters import gguf_vocab
from fastlora_jax.converters.gguf_writer import GGUFWriter


def _write(cls, path: pathlib.Path, endian: gguf.GGUFEndian) -> bytes:
    writer = cls(path, "llama", endianess=endian)
    writer.add_token_list(["a", "", "\u00e9t\u00e9", "<|im_start|>", "\U0001f999 x", " "] * 50)
    writer.add_token_types([1, 3, 6, 2**31 - 1, -5, 0] * 50)
    writer.add_token_scores([0.0, -1.5, 1e-30, -1000.0, 3.4e38, 0.1] * 50)
    writer.add_token_merges(["\u0120 t", "a b"])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.mixed_ints_floats", [1.5, 2.5])
    writer.add_key_value("test.typed", [1, 2, 3], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.UINT16)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_uint32("test.scalar", 7)
    writer.add_string("test.string", "x")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_metadata_bytes_equal_the_package_writer(endian, tmp_path):
    ours = _write(GGUFWriter, tmp_path / "ours.gguf", endian)
    theirs = _write(gguf.GGUFWriter, tmp_path / "theirs.gguf", endian)
    assert ours == theirs


@pytest.mark.parametrize("form", ["strings", "pairs"])
def test_merges_equal_the_package_conversion(form, tmp_path):
    pairs = [["\u0120", "t"], ["a b", "c"], ["x", " y "], ["\u00e9", "\u00e9"]]
    merges = pairs if form == "pairs" else [f"{a} {b}" for a, b in pairs if " " not in a + b]
    tj = {"model": {"type": "BPE", "vocab": {}, "merges": merges}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    want = gguf.SpecialVocab(tmp_path, load_merges=True).merges
    assert gguf_vocab._merges(tj) == want
