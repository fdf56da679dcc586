"""Faults from outside: SIGKILL while a checkpoint is being written, an export that runs into
the file-size limit. Each leaves the last complete state usable and says why."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastlora_jax import FastLanguageModel
from tests.e2e.test_train_cli import CLI, args, run, setup  # noqa: F401 (setup is a fixture)

TMP_MARK = "orbax-checkpoint-tmp"


def kill_during_a_checkpoint_write(cmd, checkpoints, attempts=3):
    """Start `cmd`, SIGKILL it while a checkpoint is half-written (a temporary folder exists
    next to a finished one); True when the kill landed mid-write."""
    for _ in range(attempts):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
            if any(TMP_MARK in n for n in names) and any(n.isdigit() for n in names):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                if any(TMP_MARK in p.name for p in checkpoints.iterdir()):
                    return True
                break  # it finished that save just before the kill: try again
        else:
            proc.kill()
            proc.wait()
            pytest.fail("the run ended before a checkpoint write could be interrupted")
        for p in checkpoints.parent.iterdir():  # start over in an empty output_dir
            subprocess.run(["rm", "-rf", str(p)], check=True)
    return False


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(setup, tmp_path):  # noqa: F811
    root, model, data = setup
    out = tmp_path / "o"
    steps = ["--max_steps", "12", "--save_steps", "1", "--save_total_limit", "3"]
    assert kill_during_a_checkpoint_write(args(model, data, out, *steps), out / "checkpoints")
    finished = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert finished and finished[-1] < 12
    resumed = run(args(model, data, out, *steps, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
               if line.endswith("}")]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [finished[-1]]
    assert records[-1]["step"] == 12
    assert not [p for p in (out / "checkpoints").iterdir() if TMP_MARK in p.name]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


LIMITED = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
os.execv(sys.argv[1], sys.argv[1:])
"""


def limited(cmd):
    """`cmd` run under a 1 MiB file-size limit (set in the child, then exec)."""
    return subprocess.run([sys.executable, "-c", LIMITED, *cmd], capture_output=True, text=True,
                          timeout=600)


def last_line(text):
    return text.strip().splitlines()[-1]


def test_export_past_the_file_size_limit_leaves_no_partial_folder(setup, tmp_path):  # noqa: F811
    root, model_dir, _ = setup
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False)
    model.save_pretrained(tmp_path / "adapter", tokenizer)
    export = [CLI, "export", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"),
              "--method", "merged", "--merged_dtype", "float32", "--output_dir"]
    # the merged float32 embedding alone is 6 MiB: a 1 MiB limit stops the shard mid-write
    proc = limited(export + [str(tmp_path / "new")])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert last_line(proc.stderr).startswith("error: ") and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing partial
    # overwriting a good export under the limit keeps the good one, byte for byte
    good = subprocess.run(export + [str(tmp_path / "merged")], capture_output=True, text=True,
                          timeout=600)
    assert good.returncode == 0, good.stderr
    before = tree_digest(tmp_path / "merged")
    proc = limited(export + [str(tmp_path / "merged"), "--overwrite"])
    assert proc.returncode == 2 and "File too large" in proc.stderr and "unchanged" in proc.stderr
    assert tree_digest(tmp_path / "merged") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]
