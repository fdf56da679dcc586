"""The data pipeline: chat masking, truncation, packing isolation, bad input."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from fastlora_jax import DataError, FastLanguageModel
from fastlora_jax.train.data import build_rows, load_dataset_source, tokenize_examples
from fastlora_jax.train.loss import IGNORE
from fastlora_jax.train.step import StepConfig, accumulated_grads
from tests.checkpoints import tiny_chat_model


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def chat(user, answer):
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_on_responses_only_labels_only_assistant_tokens(tmp_path, tokenizer):
    ds = load_dataset_source(write(tmp_path, [chat("What is two plus two?", "Four, of course.")]))
    [(ids, mask)] = tokenize_examples(ds, tokenizer, train_on_responses_only=True)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained.startswith("Four, of course.") and "<|im_end|>" in trained
    assert "two plus two" not in trained and "Be brief" not in trained
    rows, _ = build_rows([(ids, mask)], max_seq_length=128, packing=False)
    targets = rows["targets"][0]
    labelled = [int(t) for t in targets if t != IGNORE]
    assert tokenizer.decode(labelled) == trained
    # without the option every token is trained
    [(_, full)] = tokenize_examples(ds, tokenizer)
    assert all(full)


def test_text_field_formatting_func_and_eos(tmp_path, tokenizer):
    ds = load_dataset_source(write(tmp_path, [{"body": "hello world"}]))
    with pytest.raises(DataError, match=r"no 'text' column \(columns: \['body'\]\)"):
        tokenize_examples(ds, tokenizer)
    [(ids, _)] = tokenize_examples(ds, tokenizer, dataset_text_field="body")
    assert ids[-1] == tokenizer.eos_token_id
    [(ids2, _)] = tokenize_examples(ds, tokenizer, formatting_func=lambda e: "Q: " + e["body"])
    assert tokenizer.decode(ids2).startswith("Q: hello world")


def test_truncation_is_counted(tokenizer):
    rows, stats = build_rows([([1] * 50, [True] * 50), ([2] * 10, [True] * 10)],
                             max_seq_length=32, packing=False)
    assert stats.truncated == 1 and rows["input_ids"].shape == (2, 32)


def test_packing_layout():
    ex = [([5, 6, 7], [True] * 3), ([8, 9], [True] * 2), ([10, 11, 12, 13], [True] * 4)]
    rows, stats = build_rows(ex, max_seq_length=6, packing=True)
    assert stats.rows == 2
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(rows["targets"][0], [6, 7, IGNORE, 9, IGNORE, IGNORE])


def test_packing_isolation_loss_and_grads(tmp_path, smollm2_dir, tokenizer):
    """Changing one packed sequence leaves the other's loss and gradients unchanged."""
    folder = tiny_chat_model(tmp_path / "tiny", smollm2_dir)
    model, _ = FastLanguageModel.from_pretrained(folder, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    cfg = StepConfig(model=model.config, lora=model.lora_spec, remat=False)

    def packed(second):
        ex = [([11, 12, 13, 14, 15], [True] * 5), (second, [True] * len(second))]
        rows, _ = build_rows(ex, max_seq_length=12, packing=True)
        assert rows["segment_ids"].shape[0] == 1
        return {k: jnp.asarray(v)[None] for k, v in rows.items()}

    def first_only(batch):
        b = dict(batch)
        b["targets"] = jnp.where(batch["segment_ids"] == 1, batch["targets"], IGNORE)
        return b

    # one compiled step (as training runs it) for all four batches, which share their shapes
    step = jax.jit(lambda lora, frozen, batch: accumulated_grads(cfg, lora, frozen, batch, None))
    grads = functools.partial(step, model.lora_params(), model.params())
    b1, b2 = packed([21, 22, 23, 24]), packed([31, 32, 33, 34, 35, 36])
    l1, _, g1 = grads(first_only(b1))
    l2, _, g2 = grads(first_only(b2))
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    full1, full2 = grads(b1)[0], grads(b2)[0]
    assert float(full1) != float(full2)  # the second sequence does count in the full loss


def test_every_label_masked(tokenizer):
    with pytest.raises(DataError, match="every label is masked"):
        build_rows([([1, 2, 3], [False] * 3)], max_seq_length=8, packing=False)


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_source(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_dataset_source(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="suffix"):
        load_dataset_source(tmp_path / "x.txt")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_file_formats(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"]})
    path = tmp_path / f"d.{fmt}"
    getattr(ds, f"to_{fmt}")(str(path))
    assert load_dataset_source(path)["text"] == ["a b", "c d"]
    assert load_dataset_source(ds) is ds


def test_chat_data_needs_a_chat_template(tmp_path, smollm2_dir):
    plain = AutoTokenizer.from_pretrained(str(smollm2_dir))
    plain.chat_template = None
    ds = load_dataset_source(write(tmp_path, [chat("Hi?", "Hello.")]))
    with pytest.raises(DataError, match="has no chat template.*formatting_func"):
        tokenize_examples(ds, plain)


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "user"}], "every turn"),
    ([{"role": "user", "content": None}], "every turn"),
])
def test_malformed_turns_name_the_example(tokenizer, messages, fragment):
    import datasets

    ds = datasets.Dataset.from_list([chat("a", "b"), {"messages": messages}])
    with pytest.raises(DataError, match=f"example 1: .*{fragment}"):
        tokenize_examples(ds, tokenizer, name="eval_dataset")


@pytest.mark.parametrize("text, fragment", [
    ("null\nnull\n", "line 1: found NoneType, expected a JSON object"),  # crashes pyarrow
    ('{"text": "a"}\n[1]\n', "line 2: found list"),
    ('{"text": "a"}\n{"text": \n', "line 2: not valid JSON"),
    ('[{"text": "a"}, 3]', "entry 1 of the JSON array is int"),
])
def test_json_rows_must_be_objects(tmp_path, text, fragment):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_dataset_source(tmp_path / "d.jsonl")
