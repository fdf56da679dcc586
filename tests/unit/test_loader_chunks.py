"""Chunked loading (row chunks read and moved into preallocated device buffers) changes nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fastlora_jax import ConfigError
from fastlora_jax.converters.chunks import row_chunks
from fastlora_jax.converters.hf import load_checkpoint
from fastlora_jax.quant import QTensor, QuantKind
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint

# TINY_LLAMA: embedding [61, 32] float32 = 128 bytes a row; 7 rows a chunk, so 61 rows split
# 8 x 7 + 5 (uneven), and every stacked projection stack (>= 2 x 512 x 4 bytes) takes the
# device-buffer path while the norm stacks (2 x 32 x 4 bytes) keep the host-buffer path.
SMALL = 7 * 128


def test_row_chunks_cover_rows_within_budget():
    assert row_chunks((61, 32), 4, SMALL) == [(s, min(s + 7, 61)) for s in range(0, 61, 7)]
    assert row_chunks((61, 32), 4, 10 ** 9) == [(0, 61)]
    assert row_chunks((5, 1000), 4, 16) == [(i, i + 1) for i in range(5)]  # row > budget: 1 row
    assert row_chunks((), 4, 16) == [(0, 0)]
    assert row_chunks((0, 8), 4, 16) == [(0, 0)]


def leaves(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]


def assert_same(a, b):
    la, lb = leaves(a), leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("file_dtype,dtype,quantize", [
    (np.float32, jnp.float32, False),
    (ml_dtypes.bfloat16, jnp.bfloat16, False),
    (ml_dtypes.bfloat16, jnp.bfloat16, True),
])
def test_chunked_load_gives_identical_arrays(tmp_path, file_dtype, dtype, quantize):
    tensors = {k: v.astype(file_dtype) for k, v in llama_tensors(TINY_LLAMA).items()}
    folder = write_checkpoint(tmp_path / "ckpt", dict(TINY_LLAMA), tensors, shards=2)
    kind = QuantKind.NF4 if quantize else None
    _, whole = load_checkpoint(folder, dtype=dtype, quantize=kind, chunk_bytes=10 ** 9)
    _, chunked = load_checkpoint(folder, dtype=dtype, quantize=kind, chunk_bytes=SMALL)
    assert_same(whole, chunked)
    embed = np.asarray(chunked["embed_tokens"]["weight"])
    np.testing.assert_array_equal(embed, tensors["model.embed_tokens.weight"].astype(dtype))
    up = chunked["layers"]["mlp"]["up_proj"]["weight"]
    assert isinstance(up, QTensor) == quantize
    if not quantize:
        up = np.asarray(chunked["layers"]["mlp"]["up_proj"]["weight"])
        np.testing.assert_array_equal(up[1], tensors["model.layers.1.mlp.up_proj.weight"])


def test_quantize_takes_a_quant_kind(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))
    with pytest.raises(ConfigError, match="quantize='nf4' must be a QuantKind"):
        load_checkpoint(folder, quantize="nf4")


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1.5])
def test_chunk_bytes_must_be_positive(tmp_path, chunk_bytes):
    folder = write_checkpoint(tmp_path / "ckpt", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))
    with pytest.raises(ConfigError, match="chunk_bytes"):
        load_checkpoint(folder, chunk_bytes=chunk_bytes)
