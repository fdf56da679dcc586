"""Our K-quants (Q4_K, Q5_K, Q6_K) against the gguf package's dequantizer and ggml's quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from fastlora_jax.quant import gguf_kquants as kq
from fastlora_jax.quant import gguf_rows
from fastlora_jax.testing.refenv import run_reference

TYPES = ("Q4_K", "Q5_K", "Q6_K")


def _weights(seed: int, rows: int = 96, cols: int = 1024) -> np.ndarray:
    """Gaussian rows plus the edge cases: zero blocks, zero sub-blocks, constant negative
    blocks, heavy tails, a single outlier, all-positive rows."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[0, :256] = 0
    x[1, 256:288] = 0
    x[2, :256] = -0.5
    x[3] = rng.standard_t(2, cols) * 0.01
    x[4, 17] = 3.0
    x[5] = np.abs(x[5]) + 0.01
    x[6, :16] = 1e-20
    return x


@pytest.mark.parametrize("qtype", TYPES)
def test_our_dequantization_equals_the_gguf_package_bit_for_bit(qtype):
    import gguf
    from gguf.quants import dequantize

    x = _weights(1)
    q = gguf_rows.quantize_rows(x, qtype)
    assert q.shape == (x.shape[0], x.shape[1] // 256 * kq.BLOCK_BYTES[qtype])
    theirs = dequantize(q, getattr(gguf.GGMLQuantizationType, qtype))
    ours = np.asarray(kq.DEQUANTIZE[qtype](q.reshape(-1, kq.BLOCK_BYTES[qtype]))).reshape(x.shape)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # and the quantization is a good one: relative RMS error of Gaussian weights
    bound = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}[qtype]  # Gaussian: 0.072, 0.036, 0.018
    rel = np.sqrt(np.mean((theirs[8:] - x[8:]) ** 2) / np.mean(x[8:] ** 2))
    assert rel < bound
    assert np.all(theirs[0, :256] == 0)


def test_rows_not_filling_256_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_rows.quantize_rows(np.zeros((2, 576), np.float32), "Q4_K")


def test_chunking_does_not_change_the_bytes():
    x = _weights(2, rows=8)
    assert np.array_equal(gguf_rows.quantize_rows(x, "Q4_K", chunk_blocks=5),
                          gguf_rows.quantize_rows(x, "Q4_K"))


GGML_QUANTIZE = """
import ctypes, pathlib
import llama_cpp
lib = ctypes.CDLL(str(pathlib.Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
lib.ggml_row_size.restype = ctypes.c_size_t
lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
for name, code in ARGS["types"].items():
    x = np.ascontiguousarray(INPUTS["x"], np.float32)
    rows, cols = x.shape
    dst = np.zeros(rows * lib.ggml_row_size(code, cols), np.uint8)
    lib.ggml_quantize_chunk(code, x.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    OUTPUTS[name] = dst.reshape(rows, -1)
"""


def ggml_quantize(x: np.ndarray, types: tuple[str, ...] = TYPES) -> dict[str, np.ndarray]:
    """llama.cpp's own quantization (ggml_quantize_chunk, no importance matrix) of `x`."""
    import gguf

    codes = {t: int(getattr(gguf.GGMLQuantizationType, t)) for t in types}
    return run_reference(GGML_QUANTIZE, {"x": x}, types=codes)


@pytest.mark.reference
def test_our_bytes_match_llama_cpp_on_gaussian_and_real_weights(smollm2_dir):
    """Same bytes as ggml's reference quantizer except in rare near-ties (where the float
    rounding of a sum decides between two candidates of almost equal error), and the same total
    squared error. Real weights: SmolLM2's, reshaped into 256-value rows."""
    from gguf.quants import dequantize
    import gguf
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="numpy") as f:
        real = np.concatenate([f.get_tensor(f"model.layers.{i}.mlp.down_proj.weight").ravel()
                               for i in (0, 15)])
    x = np.concatenate([_weights(3), real.reshape(-1, 1024)[:256]]).astype(np.float32)
    ref = ggml_quantize(x)
    need = {"Q4_K": 0.97, "Q5_K": 0.995, "Q6_K": 0.999}
    for qtype in TYPES:
        ours = gguf_rows.quantize_rows(x, qtype)
        b = kq.BLOCK_BYTES[qtype]
        same = (ours.reshape(-1, b) == ref[qtype].reshape(-1, b)).all(axis=1)
        assert same.mean() >= need[qtype], (qtype, same.mean())
        t = getattr(gguf.GGMLQuantizationType, qtype)
        err_ours = np.sum((dequantize(ours, t) - x) ** 2)
        err_ref = np.sum((dequantize(ref[qtype], t) - x) ** 2)
        assert abs(err_ours / err_ref - 1) < 1e-3, (qtype, err_ours / err_ref)
