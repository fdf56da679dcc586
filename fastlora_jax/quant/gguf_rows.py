"""A whole tensor through one of our GGUF block quantizers (legacy Q4_0 ... Q8_0 or K-quants).

The jitted quantizers take float32 blocks [n, block] and return bytes [n, block bytes]. This
feeds them a tensor in chunks of a fixed number of blocks, so each type compiles a handful of
executables whatever the tensor shapes, and memory stays bounded:

- full chunks of `chunk` blocks, then (legacy types) the rest in halving sizes down to
  `chunk / 32`, the last piece padded with zero blocks, so a small tensor does not pay for a
  whole padded chunk; the K-quants, slow to compile, keep one chunk size;
- on the CPU the chunks are small (a call's working set stays in cache: measured 3-5x faster per
  weight for the K-quants at 512 blocks than at 16K, and 6x for Q8_0 at 16K blocks than at the
  whole tensor) and sliced from a host view of the tensor (no device op per slice); on an
  accelerator they are large and sliced on the device, where the tensor stays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.quant import gguf_kquants, gguf_legacy

QUANTIZE = {**gguf_legacy.QUANTIZE, **gguf_kquants.QUANTIZE}
BLOCK_BYTES = {**gguf_legacy.BLOCK_BYTES, **gguf_kquants.BLOCK_BYTES}
BLOCK = {**{t: gguf_legacy.BLOCK for t in gguf_legacy.QUANTIZE},
         **{t: gguf_kquants.QK_K for t in gguf_kquants.QUANTIZE}}
# Blocks per quantizer call on the CPU (per family: the K-quants loop over their block ~20 times)
CPU_CHUNK = {**{t: 1 << 14 for t in gguf_legacy.QUANTIZE},
             **{t: 512 for t in gguf_kquants.QUANTIZE}}
ACCELERATOR_CHUNK = 1 << 16
HALVINGS = {**{t: 5 for t in gguf_legacy.QUANTIZE}, **{t: 0 for t in gguf_kquants.QUANTIZE}}


def _pieces(n: int, chunk: int, halvings: int) -> list[tuple[int, int, int]]:
    """(start, blocks, padded size) covering n blocks: full chunks, then up to `halvings`
    halving sizes."""
    out, start, smallest = [], 0, max(1, chunk >> halvings)
    size = chunk
    while start < n:
        while size > smallest and n - start < size:
            size //= 2
        take = min(size, n - start)
        out.append((start, take, size))
        start += take
    return out


def quantize_rows(x: np.ndarray | jax.Array, qtype: str, *,
                  chunk_blocks: int | None = None) -> np.ndarray:
    """A float tensor [..., cols] (cols a multiple of the type's block) -> its GGUF bytes
    [..., cols / block * block bytes], the bytes the `gguf` package (legacy types) or ggml's
    reference quantizer (K-quants, up to rare near-ties) writes."""
    shape, block, nbytes = tuple(x.shape), BLOCK[qtype], BLOCK_BYTES[qtype]
    if shape[-1] % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} values, found {shape[-1]}")
    on_cpu = not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.devices())
    if chunk_blocks is None:
        chunk_blocks = CPU_CHUNK[qtype] if on_cpu else ACCELERATOR_CHUNK
    if on_cpu:  # a host view: slicing it is free
        blocks = np.asarray(x, np.float32).reshape(-1, block)
    else:
        blocks = jnp.asarray(x, jnp.float32).reshape(-1, block)
    fn, n = QUANTIZE[qtype], blocks.shape[0]
    out = np.empty((n, nbytes), np.uint8)
    # every piece is dispatched before any is read, so the device computes while Python slices
    pending = []
    for start, take, size in _pieces(n, chunk_blocks, HALVINGS[qtype]):
        part = blocks[start:start + take]
        if take < size:
            pad = ((0, size - take), (0, 0))
            part = np.pad(part, pad) if on_cpu else jnp.pad(part, pad)
        pending.append((start, take, fn(part)))
    for start, take, result in pending:
        out[start:start + take] = np.asarray(result)[:take]
    return out.reshape(shape[:-1] + (shape[-1] // block * nbytes,))


__all__ = ["BLOCK", "BLOCK_BYTES", "QUANTIZE", "quantize_rows"]
