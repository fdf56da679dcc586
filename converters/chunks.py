"""Read checkpoint tensors in row chunks and write them into preallocated device buffers.

Why: a whole-tensor read holds a large tensor three times at once — the memory-mapped file pages
the read touched, safetensors' copy out of the map, and the device copy (host memory too on the CPU
backend). Reading rows [start, stop) at a time through a short-lived safetensors handle keeps at
most one chunk of the file mapped (closing the handle unmaps its pages), and writing each chunk into
a device buffer allocated once (updated in place: the buffer is donated) keeps at most one chunk on
the host. A row chunk is a slice along the first axis, `[rows, *rest]`, of at most `chunk_bytes`.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from fastlora_jax.errors import CheckpointError

# Largest piece (bytes) of a tensor held on the host at once; larger tensors move in row chunks.
CHUNK_BYTES = 16 * 2**20


def row_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges covering `shape[0]` rows, each at most `chunk_bytes` (>= 1 row).

    A scalar (shape ()) or a tensor of at most `chunk_bytes` is one chunk covering everything.
    """
    if not shape:
        return [(0, 0)]
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, chunk_bytes // max(row_bytes, 1))
    return [(start, min(start + rows, shape[0])) for start in range(0, max(shape[0], 1), rows)]


def read_rows(file: pathlib.Path, name: str, start: int | None = None,
              stop: int | None = None) -> np.ndarray:
    """Tensor `name` of `file` (rows [start, stop) when given) as a fresh host numpy array.

    The file is opened for this read only, so the pages it touched are unmapped on return.
    """
    try:
        with safe_open(str(file), framework="numpy") as f:
            if start is None:
                return f.get_tensor(name)
            return f.get_slice(name)[start:stop]
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(file)!r}: tensor {name!r} could not be read ({err}); the "
                              f"file is truncated or corrupt — re-download it") from None


def read_whole(file: pathlib.Path, name: str, shape: tuple[int, ...], itemsize: int,
               chunk_bytes: int) -> np.ndarray:
    """Tensor `name` [*shape] on the host, read chunk by chunk into one buffer (one chunk mapped)."""
    chunks = row_chunks(shape, itemsize, chunk_bytes)
    if len(chunks) == 1:
        return read_rows(file, name)
    out = None
    for start, stop in chunks:
        rows = read_rows(file, name, start, stop)
        if out is None:
            out = np.empty(shape, rows.dtype)
        out[start:stop] = rows
    return out


@functools.partial(jax.jit, donate_argnums=0)
def write_rows(buf: jax.Array, rows: Any, start: jax.Array | int) -> jax.Array:
    """buf [R, *rest] with rows [r, *rest] written at buf[start:start + r], in place (donated).

    Compiles once per (buf shape, rows shape, dtypes); `start` is traced, so every chunk of the
    same shape reuses one executable.
    """
    return jax.lax.dynamic_update_slice_in_dim(buf, rows.astype(buf.dtype), start, axis=0)


def device_zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """A zero-filled device buffer to be filled by `write_rows`."""
    return jax.numpy.zeros(shape, dtype)


__all__ = ["CHUNK_BYTES", "device_zeros", "read_rows", "read_whole", "row_chunks", "write_rows"]
