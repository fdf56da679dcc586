"""Fuzzed dataset rows: JSONL files of text and chat examples (see tests/fuzz/common.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlora_jax.api import load_tokenizer
from fastlora_jax.train.data import build_rows, load_dataset_source, tokenize_examples
from tests.checkpoints import TINY_LLAMA, llama_tensors, tiny_tokenizer, write_checkpoint
from tests.fuzz.common import (CASES, FUZZ, Counter, cli_error, entries, fresh_dir, json_values,
                               outcome)

WORDS = st.lists(st.sampled_from(["the", "cat", "sat", "hello", "world", ".", "zzz"]),
                 max_size=12).map(" ".join)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "", "USER"])
turns = st.fixed_dictionaries({"role": ROLES | json_values, "content": WORDS | json_values}) \
    | json_values
conversations = st.lists(st.fixed_dictionaries({"role": ROLES, "content": WORDS}), max_size=4) \
    | st.lists(turns, max_size=3) | json_values


@st.composite
def rows(draw):
    """A dataset file's lines: text rows, chat rows, rows of other columns, or junk lines."""
    kind = draw(st.sampled_from(["text", "chat", "mixed", "junk"]))
    out = []
    for _ in range(draw(st.integers(0, 5))):
        if kind == "text" or (kind == "mixed" and draw(st.booleans())):
            row = {"text": draw(WORDS | json_values)}
        elif kind in ("chat", "mixed"):
            row = {"messages": draw(conversations)}
        else:
            row = draw(json_values)
        if draw(st.integers(0, 5)) == 0:
            row = dict(row, **draw(st.dictionaries(st.sampled_from(["text", "messages", "x"]),
                                                   json_values, max_size=1))) \
                if isinstance(row, dict) else row
        out.append(row)
    if draw(st.integers(0, 4)) == 0:  # one JSON array instead of JSON Lines
        return json.dumps(out)
    lines = [json.dumps(row) for row in out]
    if kind == "junk" and draw(st.booleans()):
        lines.append(draw(st.text(max_size=30)))
    return "\n".join(lines) + ("\n" if lines and draw(st.booleans()) else "")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Llama whose folder holds the word-level tokenizer (its vocabulary fits)."""
    folder = write_checkpoint(tmp_path_factory.mktemp("data") / "m", dict(TINY_LLAMA),
                              llama_tensors(TINY_LLAMA))
    return tiny_tokenizer(folder)


def test_dataset_rows(model, tmp_path):
    tokenizer = load_tokenizer(model)
    count = Counter()

    @FUZZ
    @given(rows(), st.booleans(), st.booleans())
    def case(text, responses_only, packing):
        folder = fresh_dir(tmp_path)
        path = folder / "data.jsonl"
        path.write_text(text)

        def pipeline():
            examples = tokenize_examples(load_dataset_source(path), tokenizer,
                                         train_on_responses_only=responses_only)
            build_rows(examples, max_seq_length=16, packing=packing,
                       pad_token_id=tokenizer.pad_token_id)

        error = outcome(pipeline)
        count.add(error)
        if error is not None:  # the CLI stops at the same data, before any output is written
            cli_error(["train", "--model", str(model), "--data", str(path), "--output_dir",
                       str(folder / "out"), "--max_seq_length", "16", "--max_steps", "1",
                       "--train_on_responses_only", str(responses_only),
                       "--packing", str(packing), "--per_device_train_batch_size", "1",
                       "--gradient_accumulation_steps", "1"])
            assert entries(folder) == ["data.jsonl"]
        shutil.rmtree(folder)

    case()
    assert count.seen == CASES and count.failed >= CASES // 2, vars(count)
