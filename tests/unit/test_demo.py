"""The demo's task: held-out sentences name nouns no training sentence contains."""

from __future__ import annotations

import re

from fastlora_jax.demo import HELD_OUT_NOUNS, TRAIN_NOUNS, make_examples


def words(example):
    return set(re.findall(r"[a-z]+", " ".join(m["content"] for m in example["messages"]).lower()))


def test_held_out_nouns_never_appear_in_training_sentences():
    train = make_examples(500, seed=0)
    held_out = make_examples(100, seed=1, held_out=True)
    seen = set().union(*(words(e) for e in train))
    held = {noun for nouns in HELD_OUT_NOUNS.values() for noun in nouns}
    assert not seen & held
    assert {e["noun"] for e in held_out} <= held and {e["noun"] for e in train} <= {
        n for nouns in TRAIN_NOUNS.values() for n in nouns}
    assert all(e["noun"] in words(e) for e in held_out)
    assert {e["tag"] for e in held_out} == {"alpha", "beta", "gamma"}  # every category tested
