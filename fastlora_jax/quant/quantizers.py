"""The host quantizer of each `QuantKind`: what `load_in_4bit` / `load_in_8bit` run while loading.

`quantize(w, kind)` is the one entry point the checkpoint loader calls for a frozen weight; the
format is chosen by the `QuantKind` enum, never by a string. Both quantizers run in host numpy and
reproduce what bitsandbytes would store for the same weights (NF4: bitsandbytes' bytes exactly;
int8: its per-output-channel absmax scaling).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fastlora_jax.errors import ConfigError
from fastlora_jax.quant.int8 import quantize_int8
from fastlora_jax.quant.nf4 import quantize_nf4
from fastlora_jax.quant.qtensor import QTensor, QuantKind

QUANTIZERS: dict[QuantKind, Callable[..., QTensor]] = {
    QuantKind.NF4: quantize_nf4,
    QuantKind.INT8: quantize_int8,
}


def quantize(w: np.ndarray, kind: QuantKind, *, dtype: str | np.dtype | None = None) -> QTensor:
    """Quantize w [*lead, N, K] to `kind`; `dtype` is what `dequantize` returns (default w's)."""
    if not isinstance(kind, QuantKind):
        raise ConfigError(f"quantize: kind={kind!r} is not a QuantKind; use one of "
                          f"{[f'QuantKind.{k.name}' for k in QuantKind]}")
    return QUANTIZERS[kind](w, dtype=dtype)
