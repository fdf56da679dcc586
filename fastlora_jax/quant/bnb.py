"""Read and write bitsandbytes 4-bit (NF4, double-quantized) tensors as transformers serializes them.

Keys per quantized Linear (relative to the module prefix): `weight` uint8 [(N*K+1)//2, 1],
`weight.absmax` uint8 [nblocks], `weight.quant_map` float32 [16], `weight.nested_absmax` float32
[ceil(nblocks/256)], `weight.nested_quant_map` float32 [256], and
`weight.quant_state.bitsandbytes__nf4` uint8 [len(json)] holding
{"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}.
"""

from __future__ import annotations

import json

import numpy as np

from fastlora_jax.errors import CheckpointError
from fastlora_jax.quant.maps import DYNAMIC_MAP, NF4_MAP
from fastlora_jax.quant.qtensor import QTensor, QuantKind

STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_FP4_KEY = "weight.quant_state.bitsandbytes__fp4"
_DTYPES = ("bfloat16", "float16", "float32")


def _get(tensors: dict[str, np.ndarray], key: str, prefix: str) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(f"{prefix}{key}: missing from the bnb-4bit state (found keys "
                              f"{sorted(tensors)}); the checkpoint is incomplete: re-save it with "
                              f"bnb_4bit_use_double_quant=True and bnb_4bit_quant_type='nf4'")
    return np.asarray(tensors[key])


def _check_shape(arr: np.ndarray, numel: int, dtype: np.dtype, key: str) -> np.ndarray:
    if arr.dtype != dtype or arr.size != numel:
        raise CheckpointError(f"{key}: expected {np.dtype(dtype).name} with {numel} elements, found "
                              f"{arr.dtype} with shape {arr.shape}; the checkpoint is corrupt or "
                              f"does not match its quant_state")
    return arr.reshape(-1)


def from_bnb_4bit(tensors: dict[str, np.ndarray], *, prefix: str = "") -> QTensor:
    """Build an NF4 QTensor from one Linear's bnb-4bit tensors (keys above; `prefix` only names them)."""
    if STATE_KEY not in tensors and _FP4_KEY in tensors:
        raise CheckpointError(f"{prefix}{_FP4_KEY}: quant_type 'fp4' is not supported, expected "
                              f"'nf4'; quantize with bnb_4bit_quant_type='nf4' or load bf16 weights")
    blob = _get(tensors, STATE_KEY, prefix)
    try:
        state = json.loads(bytes(blob.astype(np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{prefix}{STATE_KEY}: not a JSON blob ({e}); the checkpoint is "
                              f"corrupt") from None
    key = prefix + STATE_KEY
    expect = {"quant_type": "nf4", "blocksize": 64, "nested_blocksize": 256,
              "nested_dtype": "float32"}
    for field, want in expect.items():
        if state.get(field) != want:
            raise CheckpointError(f"{key}: {field}={state.get(field)!r}, expected {want!r} (NF4, "
                                  f"blocksize 64 with double quantization); re-quantize with "
                                  f"bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) for s in shape)):
        raise CheckpointError(f"{key}: shape={shape!r}, expected [out, in]")
    dtype = state.get("dtype")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{key}: dtype={dtype!r}, expected one of {_DTYPES}")
    if "nested_offset" not in state:
        raise CheckpointError(f"{key}: no nested_offset; expected a double-quantized state")
    n, k = shape
    numel = n * k
    nblocks = -(-numel // 64)
    codes = _check_shape(_get(tensors, "weight", prefix), (numel + 1) // 2, np.dtype(np.uint8),
                         prefix + "weight")
    absmax = _check_shape(_get(tensors, "weight.absmax", prefix), nblocks, np.dtype(np.uint8),
                          prefix + "weight.absmax")
    nested = _check_shape(_get(tensors, "weight.nested_absmax", prefix), -(-nblocks // 256),
                          np.dtype(np.float32), prefix + "weight.nested_absmax")
    qmap = _check_shape(_get(tensors, "weight.quant_map", prefix), 16, np.dtype(np.float32),
                        prefix + "weight.quant_map")
    if not np.array_equal(qmap, NF4_MAP):
        raise CheckpointError(f"{prefix}weight.quant_map: expected the NF4 code book {NF4_MAP.tolist()}, "
                              f"found {qmap.tolist()}")
    nmap = _check_shape(_get(tensors, "weight.nested_quant_map", prefix), 256,
                        np.dtype(np.float32), prefix + "weight.nested_quant_map")
    if not np.array_equal(nmap, DYNAMIC_MAP):
        raise CheckpointError(f"{prefix}weight.nested_quant_map: expected bitsandbytes' signed "
                              f"8-bit dynamic map, found a different table (first values "
                              f"{nmap[:4].tolist()})")
    return QTensor(codes=codes, absmax=absmax, nested_absmax=nested,
                   nested_offset=np.asarray(state["nested_offset"], np.float32), shape=(n, k),
                   dtype=dtype, kind=QuantKind.NF4, blocksize=64, nested_blocksize=256)


def to_bnb_4bit(q: QTensor) -> dict[str, np.ndarray]:
    """The bnb-4bit tensors of one NF4 matrix (no leading axes), keys as in `from_bnb_4bit`."""
    if q.kind is not QuantKind.NF4 or q.lead:
        raise CheckpointError(f"to_bnb_4bit: expected one NF4 matrix, found kind={q.kind.value} "
                              f"with leading axes {q.lead}; index the stacked QTensor first")
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": q.dtype,
             "shape": list(q.shape), "nested_blocksize": q.nested_blocksize,
             "nested_dtype": "float32",
             "nested_offset": float(np.asarray(q.nested_offset, np.float32))}
    blob = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()
    return {
        "weight": np.asarray(q.codes, np.uint8).reshape(-1, 1),
        "weight.absmax": np.asarray(q.absmax, np.uint8),
        "weight.quant_map": NF4_MAP.copy(),
        "weight.nested_absmax": np.asarray(q.nested_absmax, np.float32),
        "weight.nested_quant_map": DYNAMIC_MAP.copy(),
        STATE_KEY: blob,
    }
