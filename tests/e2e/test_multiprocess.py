"""Two real processes (jax.distributed on localhost, 2 fake CPU devices each) train a tiny NF4
model through `fastlora-jax train`: they agree with each other and with one process of 4
devices, only process 0 writes the run's files, and a SIGKILL of both + resume continues."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from fastlora_jax.demo import make_examples, write_jsonl
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint
from fastlora_jax.testing.refenv import REPO
from fastlora_jax.train.logs import read_log

CLI = str(REPO / ".venv" / "bin" / "fastlora-jax")
STEPS = ["--max_steps", "5", "--save_steps", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    import shutil

    root = tmp_path_factory.mktemp("mp")
    # hidden 128: every NF4 row piece of a 2-way fsdp split holds whole 64-element blocks
    config = dict(TINY_LLAMA, vocab_size=49152, hidden_size=128, intermediate_size=256,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    tensors = llama_tensors(config, seed=7)
    tensors["model.embed_tokens.weight"] *= 0.05
    write_checkpoint(root / "tiny", config, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, root / "tiny" / name)
    data = write_jsonl(make_examples(64, seed=5), root / "data.jsonl")
    return root / "tiny", data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model, data, out, *extra):
    return [CLI, "train", "--model", str(model), "--data", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--max_seq_length", "64", "--learning_rate", "0.002", "--r", "4",
            "--load_in_4bit", "true", "--mesh", "2,2,1", "--train_on_responses_only", "true",
            "--disable_tqdm", "true", "--use_gradient_checkpointing", "true", *STEPS, *extra]


def env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def launch(model, data, out, *extra):
    """Both processes of one two-process run (Popen objects)."""
    port = free_port()
    return [subprocess.Popen(command(model, data, out, "--coordinator_address",
                                     f"127.0.0.1:{port}", "--num_processes", "2",
                                     "--process_id", str(i), *extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(2))
            for i in range(2)]


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    return outs


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and "checkpoints" not in p.parts and "runs" not in p.parts)


def losses(folder):
    """{step: training loss} of the run's log (a resume marker and later rewrites folded in)."""
    train, _ = read_log(folder / "log.jsonl")
    return {step: record["loss"] for step, record in train.items()}


def test_two_processes_equal_one_process_only_rank0_writes_and_resume(setup, tmp_path):
    """One 4-device process as the reference; two 2-device processes killed (SIGKILL, both)
    after checkpoint 2 and resumed: their log (steps 1-2 from before the kill, 3-5 after) and
    adapter equal the reference, and their folder holds the reference's files, each once."""
    model, data = setup
    one = subprocess.run(command(model, data, tmp_path / "one"), capture_output=True, text=True,
                         env=env(4), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    out = tmp_path / "two"
    procs = launch(model, data, out)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "2").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended early"
        time.sleep(0.01)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not (out / "checkpoints" / "5").exists(), "the run was not interrupted"
    (out0, _), (out1, _) = finish(launch(model, data, out, "--resume_from_checkpoint", "true"))
    assert "done: 5 steps" in out0 and "data:" in out0
    assert "done:" not in out1 and "data:" not in out1  # process 1 reports nothing
    assert files(out) == files(tmp_path / "one")
    assert len(list((out / "runs").rglob("events.*"))) == 2  # the killed run's and the resumed
    ref, got = losses(tmp_path / "one"), losses(out)
    assert '"event": "resume", "step": 2' in (out / "log.jsonl").read_text()
    assert sorted(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                               rtol=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_mesh_that_does_not_match_the_processes_is_one_error(setup, tmp_path):
    model, data = setup
    procs = launch(model, data, tmp_path / "bad", "--mesh", "2,2,2")
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 2, stderr[-2000:]
        assert ("MeshConfig(data=2, fsdp=2, tensor=2): data*fsdp*tensor = 8 must equal the number "
                "of devices, 4 (2 processes x 2 local devices" in stderr), stderr[-2000:]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_resume_on_a_different_mesh_shape(setup, tmp_path):
    """Checkpoints written on a 2x2x2 mesh restore onto 1x8x1 with sharded adapters and
    optimizer state (in this process's 8 devices), values unchanged, and training goes on."""
    import jax

    from fastlora_jax import FastLanguageModel, SFTTrainer, TrainingArguments
    from fastlora_jax.sharding import MeshConfig
    from fastlora_jax.train.checkpoint import TrainCheckpoints

    model_dir, data = setup

    def trainer(mesh, steps):
        model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64,
                                                       load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=4)
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, save_steps=2,
                                 per_device_train_batch_size=1, gradient_accumulation_steps=1,
                                 learning_rate=2e-3, disable_tqdm=True, report_to="none",
                                 mesh=mesh)
        return SFTTrainer(model=model, tokenizer=tok, train_dataset=str(data), args=args)

    first = trainer(MeshConfig(data=2, fsdp=2, tensor=2), 2)
    first.train()
    saved = jax.tree.map(np.asarray, first.model.lora_params())
    second = trainer(MeshConfig(data=1, fsdp=8, tensor=1, shard_adapters=True), 4)
    lora = jax.tree.map(jax.numpy.copy, second.model.lora_params())
    _, s_lora, s_opt = second._place(second.model.params(), lora, second.optimizer.init(lora))
    assert any(x.sharding.spec != () for x in jax.tree.leaves(s_lora))  # adapters split
    ckpt = TrainCheckpoints(tmp_path / "run", max_to_keep=None)
    state, meta = ckpt.restore(2, {"lora": s_lora, "opt_state": s_opt})
    restored = state["lora"]
    ckpt.close()
    assert meta["step"] == 2
    flat = lambda t: {jax.tree_util.keystr(k): v for k, v in
                      jax.tree_util.tree_flatten_with_path(t)[0]}
    want = flat(saved)
    assert flat(restored).keys() == want.keys()
    for key, value in flat(restored).items():
        np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=key)
    stats = second.train(resume_from_checkpoint=True)
    assert stats["start_step"] == 2 and stats["global_step"] == 4
    assert np.isfinite(stats["final_loss"])
