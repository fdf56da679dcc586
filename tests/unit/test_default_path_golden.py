"""The default dispatch's numbers, pinned: logits and LoRA gradients of two tiny seeded models
(NF4 frozen weights in bfloat16, dense float32 weights) through `ops`' default choice on the CPU,
compared bit for bit with tests/data/default_path_golden.npz.

The fixture was written by this file's `__main__` from the code before the kernels and the
dispatch were pruned; the test proves that refactoring left every default path's
arithmetic unchanged. Regenerate it (`python -m tests.unit.test_default_path_golden`) only at a
commit whose default path is known to be unchanged, and say so in the commit message. XLA:CPU
may round differently on another CPU family or jax version: the failure message names both.
"""

from __future__ import annotations

import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax import ModelConfig
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.layer import lora_project, with_constants
from fastlora_jax.lora.spec import PROJECTIONS
from fastlora_jax.models import decoder
from fastlora_jax.quant import quantize_nf4

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "data" / "default_path_golden.npz"
# Every projection dimension a multiple of 64 (the NF4 block); two layers, GQA.
CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
BATCH, SEQ = 2, 16


def _inputs() -> dict[str, jax.Array]:
    """Two rows: one packed with two documents (segment ids, restarted positions), one plain."""
    ids = jax.random.randint(jax.random.key(7), (BATCH, SEQ), 0, CFG.vocab_size, jnp.int32)
    seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * SEQ], jnp.int32)
    pos = jnp.asarray([list(range(9)) + list(range(7)), list(range(SEQ))], jnp.int32)
    return dict(input_ids=ids, segment_ids=seg, positions=pos)


def _model(kind: str):
    """(frozen params, LoRA params, LoRA spec) of the 'nf4' or the 'dense' model."""
    dtype = jnp.bfloat16 if kind == "nf4" else jnp.float32
    frozen = decoder.init_params(CFG, jax.random.key(0), dtype)
    if kind == "nf4":
        for group, name in PROJECTIONS:
            w = frozen["layers"][group][name]["weight"]
            frozen["layers"][group][name]["weight"] = jax.tree.map(
                jnp.asarray, quantize_nf4(np.asarray(w.astype(jnp.float32)), dtype="bfloat16"))
    spec = resolve(LoraConfig.create(r=4, lora_alpha=8, init_lora_weights=False), CFG,
                   tuple(n for _, n in PROJECTIONS))
    return frozen, init_lora(spec, CFG, frozen), spec


def compute(kind: str) -> dict[str, np.ndarray]:
    """Logits and the gradient of sum(logits * ct) w.r.t. every LoRA array (ct fixed random), as
    float32 numpy."""
    frozen, lora, spec = _model(kind)
    batch = _inputs()
    project = lora_project(spec, train=False)

    def logits(l):
        return decoder.forward(CFG, frozen, batch["input_ids"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"],
                               lora=with_constants(l, spec, None), project=project)

    @jax.jit
    def logits_and_grads(l):
        out, pull = jax.vjp(logits, l)
        ct = jax.random.normal(jax.random.key(3), out.shape, jnp.float32)
        return out, pull(ct.astype(out.dtype))[0]

    out, grads = logits_and_grads(lora)
    result = {f"{kind}/logits": np.asarray(out.astype(jnp.float32))}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        result[f"{kind}/grad{jax.tree_util.keystr(path)}"] = np.asarray(g.astype(jnp.float32))
    return result


def _where() -> str:
    return f"{platform.machine()} {platform.processor() or '?'}, jax {jax.__version__}"


@pytest.mark.parametrize("kind", ["nf4", "dense"])
def test_default_path_is_bitwise_unchanged(kind: str) -> None:
    golden = np.load(FIXTURE)
    got = compute(kind)
    want = {k: golden[k] for k in golden.files if k.startswith(f"{kind}/")}
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        assert np.isfinite(value).all() and np.abs(value).max() > 0, name
        assert np.array_equal(value, want[name]), (
            f"{name} differs from the fixture (max |diff| "
            f"{np.abs(value - want[name]).max():.3e}); fixture written on "
            f"{golden['where']}, running on {_where()}")


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURE, where=np.asarray(_where()), **compute("nf4"), **compute("dense"))
    print(f"wrote {FIXTURE}")
