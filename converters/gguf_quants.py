"""Which GGUF type each tensor gets for a quantization method, and encoding a tensor to it.

Methods are Unsloth's / llama.cpp's names: `f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4_1`, `q5_0`,
`q5_1`, `q4_k_m`, `q5_k_m`, `q6_k`. The per-tensor choice follows llama.cpp (`llama-quantize`
without an importance matrix, which is what its users run):

- 1-D tensors and norms stay float32; float methods store every matrix in their type.
- The output matrix (the embedding too when it is tied) gets Q6_K in every quantized method
  except q8_0 (Q8_0 when its rows do not fill 256-blocks).
- `_m` mixes: attn_v (fused attn_qkv) and ffn_down of the layers `use_more_bits` picks (the first
  and last eighth, and every third in between) get Q6_K; on 80-layer llama / qwen2 models (llama.cpp's
  "70B" type) the remaining Q4_K attn_v become Q5_K.
- A K-quant whose rows are not a multiple of 256 falls back to Q5_0 / Q5_1 / Q8_0 (Q4_K / Q5_K /
  Q6_K), and any type whose block does not divide the row falls back to F16.

Every quantized type is encoded by our JAX quantizers (`fastlora_jax.quant.gguf_rows`: the legacy
types byte for byte as the `gguf` package writes them, the K-quants as ggml's reference does).
"""

from __future__ import annotations

import dataclasses

import gguf
import jax
import numpy as np

from fastlora_jax.errors import ExportError
from fastlora_jax.quant import gguf_rows

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclasses.dataclass(frozen=True)
class Method:
    """A quantization method: the file type written to the header and the default tensor type."""

    file_type: gguf.LlamaFileType
    default: gguf.GGMLQuantizationType

    @property
    def is_float(self) -> bool:
        return self.default in (T.F32, T.F16, T.BF16)


METHODS = {
    "f32": Method(F.ALL_F32, T.F32), "f16": Method(F.MOSTLY_F16, T.F16),
    "bf16": Method(F.MOSTLY_BF16, T.BF16), "q8_0": Method(F.MOSTLY_Q8_0, T.Q8_0),
    "q4_0": Method(F.MOSTLY_Q4_0, T.Q4_0), "q4_1": Method(F.MOSTLY_Q4_1, T.Q4_1),
    "q5_0": Method(F.MOSTLY_Q5_0, T.Q5_0), "q5_1": Method(F.MOSTLY_Q5_1, T.Q5_1),
    "q4_k_m": Method(F.MOSTLY_Q4_K_M, T.Q4_K), "q5_k_m": Method(F.MOSTLY_Q5_K_M, T.Q5_K),
    "q6_k": Method(F.MOSTLY_Q6_K, T.Q6_K),
}
_K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_MIXES = ("q4_k_m", "q5_k_m")


def method(name: str) -> Method:
    """The Method called `name` (case-insensitive), or an ExportError listing them."""
    key = str(name).lower()
    if key not in METHODS:
        raise ExportError(f"quantization_method={name!r} is not supported; choose one of "
                          f"{list(METHODS)}")
    return METHODS[key]


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of the layers that get more bits in the _m mixes."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _fallback(qtype: gguf.GGMLQuantizationType, ncols: int) -> gguf.GGMLQuantizationType:
    if ncols % block_size(qtype):
        qtype = _K_FALLBACK.get(qtype, qtype)
        if ncols % block_size(qtype):
            qtype = T.F16
    return qtype


def tensor_type(method_name: str, name: str, shape: tuple[int, ...], *, n_layers: int,
                tied: bool, arch: str) -> gguf.GGMLQuantizationType:
    """The GGUF type of tensor `name` [*shape] (HF order, rows last = ggml's ne[0])."""
    m = method(method_name)
    if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
        return T.F32
    if m.is_float:
        return m.default
    new = m.default
    ncols = shape[-1]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % block_size(new):
            new = T.Q8_0
        elif new != T.Q8_0:
            new = T.Q6_K
    elif ".attn_v." in name or ".attn_qkv." in name:
        if method_name in _MIXES and use_more_bits(layer, n_layers):
            new = T.Q6_K
        if arch in ("llama", "qwen2") and n_layers == 80 and new == T.Q4_K:
            new = T.Q5_K  # llama.cpp's "70B" bump
    elif ".ffn_down." in name and method_name in _MIXES and use_more_bits(layer, n_layers):
        new = T.Q6_K
    return _fallback(new, ncols)


def encode(value: np.ndarray | jax.Array, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 [*shape] (host or device) -> what GGUFWriter writes for `qtype` (float arrays
    for F32 / F16, uint8 bytes [*shape[:-1], row bytes] otherwise). Quantized types are
    computed where the value lives, float types on the host."""
    if qtype.name in gguf_rows.QUANTIZE:
        return gguf_rows.quantize_rows(value, qtype.name)
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    if qtype == T.F32:
        return value
    if qtype == T.F16:
        return value.astype(np.float16)
    return gguf.quants.quantize(value, qtype)  # BF16


__all__ = ["METHODS", "Method", "encode", "method", "tensor_type", "use_more_bits"]
