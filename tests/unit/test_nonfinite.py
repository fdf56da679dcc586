"""Non-finite steps: skipped without touching the state, counted, logged, and a stop after N."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fastlora_jax import FastLanguageModel, SFTTrainer, TrainingArguments, TrainingError
from fastlora_jax.train.checkpoint import TrainCheckpoints
from fastlora_jax.train.data import batch_at
from fastlora_jax.train.logs import read_log
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step
from tests.checkpoints import tiny_chat_model
from tests.unit.test_train_step import CFG, batch, setup

POISON = " zebra"  # its embedding row is NaN: any step whose rows hold it has a NaN loss


def test_a_non_finite_step_changes_nothing():
    frozen, spec, lora = setup(r=4)
    frozen["embed_tokens"]["weight"] = frozen["embed_tokens"]["weight"].at[7].set(jnp.nan)
    opt = make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    cfg = StepConfig(model=CFG, lora=spec)
    state = opt.init(lora)
    good, bad = batch(1, 2, 12, seed=1), batch(1, 2, 12, seed=2)
    good = dict(good, input_ids=jnp.where(good["input_ids"] == 7, 8, good["input_ids"]))
    bad = dict(bad, input_ids=bad["input_ids"].at[0, 0, 3].set(7))
    lora, state, m = train_step(lora, state, frozen, good, cfg=cfg, optimizer=opt)
    assert float(m["skipped"]) == 0.0
    before = jax.tree.map(np.array, (lora, state))
    lora, state, m = train_step(lora, state, frozen, bad, cfg=cfg, optimizer=opt)
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((lora, state))):
        np.testing.assert_array_equal(a, np.asarray(b))  # params, moments and step count
    lora, state, m = train_step(lora, state, frozen, good, cfg=cfg, optimizer=opt)
    assert float(m["skipped"]) == 0.0 and int(jax.tree.leaves(state)[0]) == 2  # went on


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, smollm2_dir):
    """(a tiny chat model whose embedding of POISON's tokens is NaN, those token ids)."""
    folder = tiny_chat_model(tmp_path_factory.mktemp("poison") / "m", smollm2_dir)
    _, tokenizer = FastLanguageModel.from_pretrained(folder, dtype="float32")
    tensors = load_file(str(folder / "model.safetensors"))
    ids = tokenizer(POISON, add_special_tokens=False)["input_ids"]
    assert tokenizer.pad_token_id not in ids
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()  # untie: finite logits
    tensors["model.embed_tokens.weight"][ids] = np.nan
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    return folder, ids


def rows(n, bad):
    return [{"text": f"row {i}:" + (POISON * 3 if i in bad else " the cat sat on the mat")}
            for i in range(n)]


def trainer(folder, data, out, **kw):
    import datasets

    model, tokenizer = FastLanguageModel.from_pretrained(folder, dtype="float32", max_seq_length=24)
    model = FastLanguageModel.get_peft_model(model, r=4)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1,
                             gradient_accumulation_steps=1, learning_rate=1e-2,
                             use_gradient_checkpointing=False,
                             save_total_limit=None, report_to="none", disable_tqdm=True, **kw)
    return SFTTrainer(model, tokenizer, datasets.Dataset.from_list(data), args=args)


def poisoned_steps(t, total, ids):
    """The steps (1-based) whose batch holds a poisoned token."""
    out = []
    for step in range(total):
        b, _ = batch_at(t.data.rows[0], step, rows_per_step=1, accumulation=1, seed=t.args.seed)
        out += [step + 1] if np.isin(b["input_ids"], ids).any() else []
    return out


def test_skipped_steps_are_counted_and_logged(poisoned, tmp_path):
    folder, ids = poisoned
    t = trainer(folder, rows(12, bad={3, 8}), tmp_path / "o", max_steps=12)
    stats = t.train()
    expected = poisoned_steps(t, 12, ids)
    assert len(expected) == 2 and stats["nonfinite_steps"] == 2
    train, _ = read_log(tmp_path / "o" / "log.jsonl")
    assert sorted(s for s, r in train.items() if r.get("skipped")) == expected
    assert all(train[s]["nonfinite_total"] == sum(e <= s for e in expected) for s in train)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(t.model.lora_params()))
    assert np.isfinite(stats["final_loss"]) and stats["global_step"] == 12


def test_n_non_finite_steps_in_a_row_stop_the_run_with_the_last_checkpoint_good(poisoned, tmp_path):
    folder, ids = poisoned
    t = trainer(folder, rows(6, bad={1, 2, 3, 4, 5}), tmp_path / "o", max_steps=6,
                max_consecutive_nonfinite_steps=3, save_steps=1)
    bad = poisoned_steps(t, 6, ids)
    stop = next(s for s in bad if {s - 1, s - 2} <= set(bad))  # the third poisoned in a row
    with pytest.raises(TrainingError, match=rf"3 optimizer steps in a row \(steps {stop - 2}-{stop}\)"
                                            rf" had a non-finite") as info:
        t.train()
    assert "max_consecutive_nonfinite_steps=3" in str(info.value)
    records = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == stop and records[-1]["nonfinite_in_a_row"] == 3
    checkpoints = TrainCheckpoints(tmp_path / "o", max_to_keep=None)
    assert checkpoints.latest_step() == stop - 1  # the stopping step saved nothing
    lora = t.model.lora_params()  # what the model holds after the stop
    state, _ = checkpoints.restore(stop - 1, {"lora": lora, "opt_state": t.optimizer.init(lora)})
    checkpoints.close()
    for a, b in zip(jax.tree.leaves(state["lora"]), jax.tree.leaves(lora)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # skipped steps changed nothing
