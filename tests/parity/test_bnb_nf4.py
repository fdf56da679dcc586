"""NF4 parity with bitsandbytes itself (reference environment, CPU): bytes, dequantization, I/O."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from fastlora_jax.quant import DYNAMIC_MAP, dequantize, from_bnb_4bit, quantize_nf4, to_bnb_4bit
from fastlora_jax.quant.nf4 import _double_quantize, _torch_mean
from fastlora_jax.testing.refenv import run_reference

pytestmark = pytest.mark.reference

# name -> (shape, dtype): a real projection shape; odd numel with a partial 64-block; a partial
# 256-block of absmax; a matrix holding an all-zero 64-block; fewer than 256 absmax values; and
# >= 32768 absmax values (torch's mean runs on several threads), numel a multiple of neither 64
# nor 64 * 256.
CASES = {
    "bf16_proj": ((128, 896), "bfloat16"),
    "f32_odd": ((37, 51), "float32"),
    "f32_nested": ((300, 1000), "float32"),
    "bf16_zero_block": ((96, 200), "bfloat16"),
    "f16_small": ((16, 1000), "float16"),
    "bf16_threaded": ((1111, 2007), "bfloat16"),
}
THREADS = (1, 2)  # torch intra-op threads of the reference runs
SMALL = [name for name in CASES if name != "bf16_threaded"]  # for the slower round trips
_NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}

_QUANTIZE = """
import torch
import bitsandbytes.functional as F
for threads in ARGS["threads"]:
    torch.set_num_threads(threads)
    for name in ARGS["names"]:
        a = torch.from_numpy(INPUTS[name]).to(getattr(torch, ARGS["dtypes"][name]))
        packed, st = F.quantize_4bit(a, blocksize=64, quant_type="nf4", compress_statistics=True)
        tag = f"{name}.t{threads}"
        OUTPUTS[tag + ".codes"] = packed.reshape(-1).numpy()
        OUTPUTS[tag + ".absmax"] = st.absmax.numpy()
        OUTPUTS[tag + ".nested_absmax"] = st.state2.absmax.numpy()
        OUTPUTS[tag + ".offset"] = st.offset.reshape(1).numpy()
torch.set_num_threads(1)
for name in ARGS["small"]:
    a = torch.from_numpy(INPUTS[name]).to(getattr(torch, ARGS["dtypes"][name]))
    packed, st = F.quantize_4bit(a, blocksize=64, quant_type="nf4", compress_statistics=True)
    OUTPUTS[name + ".nested_map"] = st.state2.code.numpy()
    OUTPUTS[name + ".deq"] = F.dequantize_4bit(packed, st).float().numpy()
    OUTPUTS[name + ".sd.weight"] = packed.numpy()
    for k, v in st.as_dict(packed=True).items():
        OUTPUTS[name + ".sd.weight." + k] = v.numpy()
"""

_LOAD_OURS = """
import torch
import bitsandbytes.functional as F
from bitsandbytes.functional import QuantState
for name in ARGS["names"]:
    sd = {k[len(name) + 1:]: torch.from_numpy(v) for k, v in INPUTS.items() if k.startswith(name + ".")}
    qs = QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"},
                              device=torch.device("cpu"))
    OUTPUTS[name] = F.dequantize_4bit(sd["weight"], qs).float().numpy()
"""


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    out = {}
    for name, (shape, dtype) in CASES.items():
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if name == "bf16_zero_block":
            w.reshape(-1)[64 * 5: 64 * 6] = 0.0
        out[name] = w.astype(_NP_DTYPES[dtype]).astype(np.float32)
    return out



@pytest.fixture(scope="module")
def bnb() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    inputs = _inputs()
    outputs = run_reference(_QUANTIZE, inputs, names=list(CASES), small=SMALL, threads=list(THREADS),
                            dtypes={k: v[1] for k, v in CASES.items()})
    return inputs, outputs


def _ours(inputs: dict[str, np.ndarray], name: str, torch_threads: int = 1):
    return quantize_nf4(inputs[name].astype(_NP_DTYPES[CASES[name][1]]), torch_threads=torch_threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("name", list(CASES))
def test_bytes_bit_exact(bnb, name: str, threads: int) -> None:
    inputs, ref = bnb
    q = _ours(inputs, name, threads)
    tag = f"{name}.t{threads}"
    np.testing.assert_array_equal(q.codes, ref[tag + ".codes"])
    np.testing.assert_array_equal(np.asarray(q.nested_offset).reshape(1), ref[tag + ".offset"])
    np.testing.assert_array_equal(q.nested_absmax, ref[tag + ".nested_absmax"])
    np.testing.assert_array_equal(q.absmax, ref[tag + ".absmax"])


_BLOCKWISE = """
import torch
import bitsandbytes.functional as F
for name, d in INPUTS.items():
    q, st = F.quantize_blockwise(torch.from_numpy(d), blocksize=256)
    OUTPUTS[name + ".codes"] = q.numpy()
    OUTPUTS[name + ".nested"] = st.absmax.numpy()
"""

_MEAN = """
import torch
for threads in ARGS["threads"]:
    torch.set_num_threads(threads)
    for name, x in INPUTS.items():
        OUTPUTS[f"{name}.t{threads}"] = torch.from_numpy(x).mean().reshape(1).numpy()
"""


def _near_midpoints(rng: np.random.Generator, n: int) -> np.ndarray:
    """n float32 values in [-1, 1] within a few ulp of midpoints between dynamic-map entries."""
    mid = (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32)
    toward = np.where(rng.random(n) < 0.5, np.float32(-2), np.float32(2))
    return np.nextafter(rng.choice(mid, n), toward).astype(np.float32)


def test_double_quantization_matches_bnb_blockwise() -> None:
    """_double_quantize == bitsandbytes' quantize_blockwise(absmax - offset, blocksize=256)."""
    rng = np.random.default_rng(99)
    cases = {}
    for n in (1, 100, 255, 256, 257, 1000, 4097, 70000):
        absmax = (np.abs(rng.standard_normal(n)) * rng.uniform(1e-3, 0.1)).astype(np.float32)
        cases[f"rand{n}"] = (absmax, np.float32(absmax.mean()))
    # Blocks whose extreme is exactly 1, so the other values reach the quantizer unscaled and sit
    # next to the midpoints where its grid lookup and the exact nearest entry can disagree.
    tricky = _near_midpoints(rng, 4 * 256).reshape(4, 256)
    tricky[:, 0] = 1.0
    tricky[2, 0] = -1.0
    tricky[3] = 0.0  # an all-zero block
    cases["tricky"] = (tricky.reshape(-1), np.float32(0.0))
    ref = run_reference(_BLOCKWISE, {k: a - o for k, (a, o) in cases.items()})
    for name, (absmax, offset) in cases.items():
        codes, nested = _double_quantize(absmax, offset)
        np.testing.assert_array_equal(nested, ref[name + ".nested"], err_msg=name)
        np.testing.assert_array_equal(codes, ref[name + ".codes"], err_msg=name)


def test_offset_is_torch_mean() -> None:
    """_torch_mean == torch's CPU float32 mean, serial and split over threads."""
    rng = np.random.default_rng(5)
    sizes = (1, 3, 7, 8, 9, 31, 33, 100, 1001, 4096, 32767, 32768, 32769, 65537, 100003, 917504)
    xs = {f"n{n}": (np.abs(rng.standard_normal(n)) * rng.uniform(1e-3, 0.1)).astype(np.float32)
          for n in sizes}
    threads = (1, 2, 3, 16)
    ref = run_reference(_MEAN, xs, threads=list(threads))
    for name, x in xs.items():
        for t in threads:
            assert _torch_mean(x, t) == ref[f"{name}.t{t}"][0], (name, t)


@pytest.mark.parametrize("name", SMALL)
def test_dequantize_bit_exact(bnb, name: str) -> None:
    _, ref = bnb
    q = from_bnb_4bit({k[len(name) + 4:]: v for k, v in ref.items() if k.startswith(name + ".sd.")})
    deq = np.asarray(dequantize(q)).astype(np.float32)
    np.testing.assert_array_equal(deq, ref[name + ".deq"])
    assert q.dtype == CASES[name][1]


def test_serialized_state_loads(bnb) -> None:
    _, ref = bnb
    np.testing.assert_array_equal(ref["bf16_proj.nested_map"], DYNAMIC_MAP)
    sd = {k[len("bf16_proj.sd."):]: v for k, v in ref.items() if k.startswith("bf16_proj.sd.")}
    assert sorted(sd) == sorted(["weight", "weight.absmax", "weight.quant_map",
                                 "weight.nested_absmax", "weight.nested_quant_map",
                                 "weight.quant_state.bitsandbytes__nf4"])
    q = from_bnb_4bit(sd, prefix="model.layers.0.self_attn.q_proj.")
    assert q.shape == (128, 896) and q.dtype == "bfloat16"
    out = to_bnb_4bit(q)
    for key, value in sd.items():
        if key.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(out[key])) == json.loads(bytes(value))
        else:
            np.testing.assert_array_equal(out[key], value.reshape(out[key].shape), err_msg=key)


def test_our_export_dequantizes_identically_in_bnb(bnb) -> None:
    inputs, _ = bnb
    arrays, expected = {}, {}
    for name in SMALL:
        q = _ours(inputs, name)
        for key, value in to_bnb_4bit(q).items():
            arrays[f"{name}.{key}"] = value
        expected[name] = np.asarray(dequantize(q)).astype(np.float32)
    got = run_reference(_LOAD_OURS, arrays, names=SMALL)
    for name in SMALL:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
