"""Hub ids ("org/name") resolve through huggingface_hub's cache, tested offline on a cache laid out
on disk as huggingface_hub lays it out (models--org--name/snapshots/<commit>/..., refs/main).

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported, so the loads run in a
fresh interpreter with those set, as a user's script would.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.models.registry import config_from_hf
from fastlora_jax.testing.refenv import REPO
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint
from tests.gguf_files import random_params, write_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: pathlib.Path, repo_id: str) -> pathlib.Path:
    """An empty snapshot folder of `repo_id` at COMMIT, with refs/main pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    return folder


SCRIPT = """
import json, sys
import numpy as np, jax.numpy as jnp
from fastlora_jax import FastLanguageModel
from fastlora_jax.errors import CheckpointError

ids = jnp.asarray([[1, 2, 3, 4]])
out = {}
model, _ = FastLanguageModel.from_pretrained("org/tiny", dtype="float32")
out["hf"] = np.asarray(model(ids)).tolist()
out["hf_name"] = model.name_or_path
model, tokenizer = FastLanguageModel.from_pretrained("org/tiny-GGUF", gguf_file="q/tiny.gguf",
                                                     dtype="float32")
out["gguf"] = np.asarray(model(ids)).tolist()
model, _ = FastLanguageModel.from_pretrained("org/tiny-lora", dtype="float32")
out["lora"] = np.asarray(model(ids)).tolist()
for name, kwargs in (("org/missing", {}), ("org/tiny-GGUF", {}),
                     ("org/tiny-GGUF", {"gguf_file": "other.gguf"}), ("not a path", {})):
    try:
        FastLanguageModel.from_pretrained(name, **kwargs)
        out[name + str(kwargs)] = "loaded"
    except CheckpointError as err:
        out[name + str(kwargs)] = str(err)
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter (jax, transformers) plus five loads: ~45 s here
def test_hub_ids_load_from_the_offline_cache(tmp_path):
    cache = tmp_path / "hub"
    hf = dict(TINY_LLAMA, bos_token_id=1)
    write_checkpoint(_snapshot(cache, "org/tiny"), hf, llama_tensors(hf, seed=1))
    cfg = config_from_hf(TINY_LLAMA)
    params = random_params(cfg, seed=2)
    (_snapshot(cache, "org/tiny-GGUF") / "q").mkdir()  # GGUF repos often keep one folder per type
    write_gguf(cache / "models--org--tiny-GGUF" / "snapshots" / COMMIT / "q" / "tiny.gguf", cfg,
               params)
    # a PEFT adapter whose base is named by hub id, as peft and Unsloth save them
    base, _ = FastLanguageModel.from_pretrained(cache / "models--org--tiny" / "snapshots" / COMMIT,
                                                dtype="float32")
    lora = FastLanguageModel.get_peft_model(base, r=4, init_lora_weights=False)
    adapter = _snapshot(cache, "org/tiny-lora")
    lora.save_pretrained(str(adapter), overwrite=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(
        dict(config, base_model_name_or_path="org/tiny")))
    ids = jnp.asarray([[1, 2, 3, 4]])
    want_lora = np.asarray(lora(ids))

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    local, _ = FastLanguageModel.from_pretrained(cache / "models--org--tiny" / "snapshots" / COMMIT,
                                                 dtype="float32")
    np.testing.assert_array_equal(out["hf"], np.asarray(local(ids)))
    assert out["hf_name"] == "org/tiny"   # what a saved adapter names as its base
    from fastlora_jax.models.causal_lm import CausalLM
    np.testing.assert_array_equal(out["gguf"], np.asarray(CausalLM(cfg, params)(ids)))
    np.testing.assert_allclose(out["lora"], want_lora, rtol=0, atol=1e-6)
    missing = out["org/missing{}"]
    assert "'org/missing' is not in the Hugging Face cache" in missing
    assert "HF_HUB_OFFLINE=1" in missing and str(cache) in missing
    assert "pass gguf_file=" in out["org/tiny-GGUF{}"]
    assert "(file 'other.gguf') is not in the Hugging Face cache" in \
        out["org/tiny-GGUF{'gguf_file': 'other.gguf'}"]
    assert "does not exist" in out["not a path{}"] and "hub id" in out["not a path{}"]
