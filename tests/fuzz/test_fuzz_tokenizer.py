"""Fuzzed tokenizer folders: tokenizer.json, tokenizer_config.json, chat templates, special
tokens (see tests/fuzz/common.py). A tokenizer that loads is then used on chat data, where a
template that cannot render a conversation must also end in a FastLoRAError."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlora_jax.api import load_tokenizer
from fastlora_jax.train.data import tokenize_examples
from tests.checkpoints import TINY_LLAMA, llama_tensors, tiny_tokenizer, write_checkpoint
from tests.fuzz.common import (CASES, FUZZ, Counter, cli_error, entries, fresh_dir, json_values,
                               outcome)

CHAT = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hello"},
                                                 {"role": "assistant", "content": "the cat"}]}])
TEMPLATES = ["{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}{% endfor %",
             "{{ raise_exception('no') }}", "{{ messages[5]['content'] }}", "{{ 1 / 0 }}",
             "{{ messages | tojson }}", "{% if add_generation_prompt %}x{% endif %}", "{{ x.y.z }}"]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """{file name: text} of a working tokenizer folder, and a tiny model folder without one."""
    root = tmp_path_factory.mktemp("tok")
    folder = tiny_tokenizer(root / "tok")
    files = {p.name: p.read_text() for p in folder.iterdir()}
    model = write_checkpoint(root / "model", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))
    return files, model


def mutate_json(draw, text):
    """The JSON document `text` with a few values (at any depth) replaced or removed."""
    doc = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        node, path = doc, []
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                       else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            return json.dumps(draw(json_values))
        parent, key = path[-1]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(json_values)
    return json.dumps(doc)


@st.composite
def tokenizer_folders(draw, files):
    out = dict(files)
    for name in draw(st.lists(st.sampled_from(sorted(files) + ["special_tokens_map.json"]),
                              unique=True, min_size=1, max_size=2)):
        how = draw(st.sampled_from(["mutate", "mutate", "drop", "junk"]))
        if name == "chat_template.jinja" or name not in files:
            out[name] = draw(st.sampled_from(TEMPLATES) | st.text(max_size=40)) \
                if name == "chat_template.jinja" else json.dumps(draw(json_values))
        elif how == "drop":
            del out[name]
        elif how == "junk":
            out[name] = draw(st.text(max_size=60))
        else:
            out[name] = mutate_json(draw, files[name])
    return out


def test_tokenizer_folders(valid, tmp_path):
    files, model = valid
    count = Counter()

    @FUZZ
    @given(tokenizer_folders(files))
    def case(contents):
        folder = fresh_dir(tmp_path)
        for name in ("config.json", "model.safetensors"):
            (folder / name).symlink_to(model / name)
        for name, text in contents.items():
            (folder / name).write_text(text)
        before = entries(folder)

        def use():
            tokenizer = load_tokenizer(folder)
            if tokenizer is not None:
                tokenize_examples(CHAT, tokenizer, train_on_responses_only=True)

        count.add(outcome(use))
        # the CLI loads the model and its tokenizer; the data file is missing, so a tokenizer
        # that loads ends in that error instead
        cli_error(["train", "--model", str(folder), "--data", str(folder / "none.jsonl"),
                   "--output_dir", str(folder / "out")])
        assert entries(folder) == before
        shutil.rmtree(folder)

    case()
    assert count.seen == CASES and count.failed >= CASES // 4, vars(count)
