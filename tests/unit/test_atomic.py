"""Crash-safe files: folders swap in one step, failed writes leave nothing, logs append."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from fastlora_jax import ExportError
from fastlora_jax.converters.atomic import atomic_file, atomic_folder, exchange
from fastlora_jax.train.logs import RunLogger, read_log


def fill(folder: pathlib.Path, text: str) -> None:
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(text)


def leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


WATCH = """
import os, sys
target, stop = sys.argv[1], sys.argv[2]
missing = checks = 0
while not os.path.exists(stop):
    checks += 1
    if not os.path.exists(target):
        missing += 1
print(missing, checks)
"""


def test_overwrite_never_leaves_the_target_missing(tmp_path):
    """Another process polling the target never finds it missing while it is overwritten."""
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        fill(tmp, "v0")
    stop = tmp_path / "stop"
    watcher = subprocess.Popen([sys.executable, "-c", WATCH, str(target / "a.txt"), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    try:
        for version in range(1, 60):
            with atomic_folder(target, overwrite=True) as tmp:
                fill(tmp, f"v{version}")
    finally:
        stop.write_text("")
        missing, checks = map(int, watcher.communicate(timeout=60)[0].split())
    assert checks > 1000 and missing == 0
    assert (target / "a.txt").read_text() == "v59" and (target / "sub" / "b.txt").read_text() == "v59"
    assert leftovers(tmp_path) == []


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    assert exchange(tmp_path / "a", tmp_path / "b")  # Linux CI: the one-step path is taken
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_failure_inside_the_block_leaves_no_folder_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ExportError, match="File too large.*nothing was written"):
        with atomic_folder(target) as tmp:
            fill(tmp, "x")
            raise OSError(27, "File too large", str(tmp / "a.txt"))
    assert not target.exists() and leftovers(tmp_path) == []
    with atomic_folder(target) as tmp:
        fill(tmp, "old")
    with pytest.raises(ExportError, match="is unchanged"):
        with atomic_folder(target, overwrite=True) as tmp:
            raise OSError(28, "No space left on device")
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_non_empty_target_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("k")
    with pytest.raises(ExportError, match="not empty"):
        with atomic_folder(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "keep").exists()


def test_adapter_folder_holds_the_tokenizer_or_is_not_written(tmp_path):
    from fastlora_jax import FastLanguageModel
    from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint

    folder = write_checkpoint(tmp_path / "m", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))
    model, _ = FastLanguageModel.from_pretrained(folder, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=2)

    class Tokenizer:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def save_pretrained(self, where: str) -> None:
            if self.fail:
                raise OSError(28, "No space left on device")
            (pathlib.Path(where) / "tokenizer.json").write_text("{}")

    with pytest.raises(ExportError, match="No space left"):
        model.save_pretrained(tmp_path / "adapter", Tokenizer(fail=True))
    assert not (tmp_path / "adapter").exists() and leftovers(tmp_path) == []
    model.save_pretrained(tmp_path / "adapter", Tokenizer(fail=False))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]


def test_atomic_file_keeps_the_old_version_on_failure(tmp_path):
    path = tmp_path / "stats.json"
    with atomic_file(path) as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_log_appends_across_a_resume_and_survives_a_torn_line(tmp_path):
    def logger(start):
        return RunLogger(tmp_path, total_steps=6, start_step=start, tensorboard=False,
                         show_progress=False)

    first = logger(0)
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 / step, "learning_rate": 1e-3}, 10)
    first.jsonl.close()  # killed: no close(), and the last record is torn
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.2')
    second = logger(2)  # resumed from the checkpoint of step 2
    for step in (3, 4):
        second.log(step, {"loss": 0.5 / step, "learning_rate": 1e-3}, 10)
    second.log_eval(4, {"eval_loss": 0.3, "eval_perplexity": 1.35})
    second.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1 and lines[3] == '{"step": 4, "loss": 0.2'
    assert json.loads(lines[4])["event"] == "resume"
    train, evals = read_log(tmp_path / "log.jsonl")
    assert sorted(train) == [1, 2, 3, 4] and train[3]["loss"] == 0.5 / 3  # the later record wins
    assert evals[4]["eval_loss"] == 0.3
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
