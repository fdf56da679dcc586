"""Host-side NF4 quantization that reproduces bitsandbytes' bytes (blocksize 64, double quant).

`quantize_nf4(w)` gives the codes and absmax bytes of
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`
as run on the CPU. It works in numpy on fixed-size chunks, so its extra memory is a few MiB beyond
the output, whatever the size of `w` (the loader quantizes an 8B checkpoint tensor by tensor).

All bytes match bit for bit, including the double quantization of the absmax:
- the nested offset is torch's float32 `absmax.mean()`, which we reproduce by redoing torch's CPU
  cascade sum (8-lane vectors, 4 accumulators, 4 levels) and its split over threads
  (`torch_threads`; it only matters from 32768 absmax values up);
- the 8-bit codes of absmax - offset come from bitsandbytes' CPU blockwise quantizer, which maps
  each normalized value to one of 65536 grid points and looks up the dynamic-map entry nearest
  that point; it is off by one entry from the exact nearest for a fraction of a percent of the
  values, and we take the same path.
Dequantizing bitsandbytes' own bytes (`from_bnb_4bit`) matches its `dequantize_4bit` bit for bit.
"""

from __future__ import annotations

import numpy as np

from fastlora_jax.errors import KernelError
from fastlora_jax.quant.maps import DYNAMIC_MAP, NF4_BOUNDS
from fastlora_jax.quant.qtensor import QTensor, QuantKind, stack

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
_CHUNK = 1 << 20  # elements per numpy pass: a multiple of BLOCKSIZE (and even)
_TINY = np.float32(1e-38)  # bitsandbytes' clamp on the absmax before taking its reciprocal
_LUT_SIZE = 65536  # grid points of bitsandbytes' CPU 8-bit quantizer
_TORCH_LANES = 8  # float32 lanes of torch's CPU sum kernel (x86: AVX512, AVX2 and default dispatch)
_TORCH_GRAIN = 32768  # torch's parallel grain size: smaller reductions run on one thread


def _dtype_name(w: np.ndarray, dtype: str | np.dtype | None) -> str:
    name = np.dtype(dtype).name if dtype is not None else np.dtype(w.dtype).name
    if name not in ("bfloat16", "float16", "float32"):
        raise KernelError(f"quantize_nf4: dtype={name!r} is not supported; expected one of "
                          f"'bfloat16', 'float16', 'float32'")
    return name


def _quantize_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [c] (c a multiple of 64 except in the last chunk) -> (4-bit codes [c], absmax [ceil(c/64)])."""
    c = x.shape[0]
    full = c - c % BLOCKSIZE
    xb = x[:full].reshape(-1, BLOCKSIZE)
    absmax = np.abs(xb).max(axis=1)
    inv = np.float32(1.0) / np.maximum(absmax, _TINY)
    scaled = np.clip(xb * inv[:, None], -1.0, 1.0).reshape(-1)
    if full < c:
        # The partial last block: bitsandbytes divides (not multiplies) and keeps the clamped absmax.
        am = np.maximum(np.abs(x[full:]).max(), _TINY)
        scaled = np.concatenate([scaled, np.clip(x[full:] / am, -1.0, 1.0)])
        absmax = np.concatenate([absmax, np.array([am], np.float32)])
    if scaled.shape[0] % 2:
        scaled = np.concatenate([scaled, np.zeros(1, np.float32)])  # pads like bnb (code 7)
    # bucketize: the number of midpoints strictly below x (searchsorted side="left"), summed from
    # 15 vectorized comparisons: cheaper than np.searchsorted on these small sorted bounds.
    q = np.zeros(scaled.shape, np.uint8)
    for bound in NF4_BOUNDS:
        q += scaled > bound
    return q, absmax.astype(np.float32)


def _build_dynamic_lut(code: np.ndarray) -> np.ndarray:
    """[65536] uint8 lookup table of bitsandbytes' CPU 8-bit quantizer for a sorted 256-entry code.

    Entry i is the code index for the float32 grid point -1 + 2i/65535: the number of midpoints
    0.5 * (code[j] + code[j+1]) (float32) that lie strictly below it.
    """
    code = np.asarray(code, np.float32)
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)
                               ) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(mid, grid.astype(np.float32), side="left").astype(np.uint8)


_DYNAMIC_LUT = _build_dynamic_lut(DYNAMIC_MAP)
_DYNAMIC_LUT.setflags(write=False)


def _lut_index(normed: np.ndarray) -> np.ndarray:
    """float32 values (clamped to [-1, 1]) -> their int32 index in the 65536-point grid.

    bitsandbytes computes trunc(fma(t, 65535, 0.5)) with t = (x + 1) * 0.5 in float32; t * 65535 + 0.5
    is exact in float64 (t has 24 significant bits, 65535 has 16, and t >= 2^-25 when nonzero), so
    rounding that float64 once to float32 reproduces the fused multiply-add.
    """
    x = np.clip(normed, np.float32(-1.0), np.float32(1.0))
    t = ((x + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    u = (t.astype(np.float64) * (_LUT_SIZE - 1) + 0.5).astype(np.float32)
    return u.astype(np.int32)


def _double_quantize(absmax: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' quantize_blockwise(absmax - offset, blocksize=256) on the CPU, byte for byte.

    absmax float32 [nb] -> (codes uint8 [nb], nested_absmax float32 [ceil(nb/256)]). Like its CPU
    kernel, each value is multiplied by the float32 reciprocal of its block's max |.|, put on a
    65536-point grid over [-1, 1] and mapped through a table of the dynamic-map entry nearest each
    grid point (so a value near a midpoint can land one entry off the exact nearest). A block whose
    max |.| is zero gets code 0.
    """
    d = (absmax.astype(np.float32) - np.float32(offset)).astype(np.float32)
    nb = d.shape[0]
    nb2 = -(-nb // NESTED_BLOCKSIZE)
    blocks = np.zeros(nb2 * NESTED_BLOCKSIZE, np.float32)
    blocks[:nb] = d
    blocks = blocks.reshape(nb2, NESTED_BLOCKSIZE)
    nested = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.float32(1.0) / nested
        normed = (blocks * inv[:, None]).reshape(-1)[:nb]
    codes = _DYNAMIC_LUT[_lut_index(np.nan_to_num(normed, nan=-1.0))]
    codes[np.repeat(nested == 0, NESTED_BLOCKSIZE)[:nb]] = 0
    return codes, nested.astype(np.float32)


def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def _torch_cascade(rows: np.ndarray) -> np.ndarray:
    """float32 [m, w] -> [w]: torch's 4-level cascade sum down axis 0, each column on its own.

    Rows are summed one after another in groups of `step` (16 unless m > 2^19); group sums go to
    level 1, which moves up to level 2 after every `step` groups and level 2 to level 3 after every
    `step`^2; the leftover rows then go to level 0, which finally adds levels 1, 2, 3 in order.
    """
    m, w = rows.shape
    power = max(4, _ceil_log2(m) // 4)
    step, mask = 1 << power, (1 << power) - 1
    groups = m // step
    acc = np.zeros((4, w), np.float32)
    if groups:
        g = rows[: groups * step].reshape(groups, step, w)
        sums = g[:, 0].copy()
        for j in range(1, step):
            sums += g[:, j]
        done = 0
        for s in sums:
            done += step
            acc[1] += s
            for level in (2, 3):
                if done & (mask << ((level - 1) * power)):
                    break
                acc[level] += acc[level - 1]
                acc[level - 1] = 0
    for r in rows[groups * step:]:
        acc[0] += r
    for level in (1, 2, 3):
        acc[0] += acc[level]
    return acc[0]


def _torch_row_sum(x: np.ndarray) -> np.float32:
    """torch's CPU float32 sum of a contiguous 1-D slice, as one thread computes it.

    Slices of >= 8 values are read as vectors of 8 lanes (checked on torch 2.13 x86 with AVX512,
    AVX2 and default dispatch), shorter ones one value at a time. The vectors are
    dealt round-robin to 4 accumulators that are cascade-summed, leftover vectors go to the
    first, and the other three are added to it; then the leftover scalars and the lanes, in order,
    are added to a running float32 sum that starts at zero.
    """
    n = x.shape[0]
    lanes = _TORCH_LANES if n >= _TORCH_LANES else 1
    nv = n // lanes
    vecs = x[: nv * lanes].reshape(nv, lanes)
    m = nv // 4
    part = _torch_cascade(vecs[: m * 4].reshape(m, 4 * lanes)).reshape(4, lanes)
    acc = part[0].copy()
    for v in vecs[m * 4:]:
        acc += v
    for k in (1, 2, 3):
        acc += part[k]
    total = np.float32(0.0)
    for v in x[nv * lanes:]:
        total = np.float32(total + v)
    for v in acc:
        total = np.float32(total + v)
    return total


def _torch_mean(x: np.ndarray, threads: int = 1) -> np.float32:
    """torch.Tensor.mean() of a contiguous float32 1-D array on the CPU with `threads` intra-op threads.

    torch computes sum / n. Below 32768 values (or with one thread) one thread sums everything;
    otherwise OpenMP splits [0, n) into min(threads, ceil(n / 32768)) equal slices (the last one
    shorter), each summed as above, and the `threads` per-thread results (zero for idle threads)
    are summed again the same way.
    """
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    if n < _TORCH_GRAIN or threads <= 1:
        total = _torch_row_sum(x)
    else:
        chunk = -(-n // min(threads, -(-n // _TORCH_GRAIN)))
        partial = np.zeros(threads, np.float32)
        for t, start in enumerate(range(0, n, chunk)):
            partial[t] = _torch_row_sum(x[start:start + chunk])
        total = _torch_row_sum(partial)
    return np.float32(total / np.float32(n))


def _quantize_matrix(w: np.ndarray, dtype: str, torch_threads: int) -> QTensor:
    n, k = w.shape
    numel = n * k
    flat = w.reshape(-1)
    codes = np.empty((numel + 1) // 2, np.uint8)
    absmax = np.empty(-(-numel // BLOCKSIZE), np.float32)
    for start in range(0, numel, _CHUNK):
        stop = min(start + _CHUNK, numel)
        q, am = _quantize_chunk(np.asarray(flat[start:stop], dtype=np.float32))
        codes[start // 2: start // 2 + q.shape[0] // 2] = (q[0::2] << 4) | q[1::2]
        absmax[start // BLOCKSIZE: start // BLOCKSIZE + am.shape[0]] = am
    offset = _torch_mean(absmax, torch_threads)
    qabsmax, nested = _double_quantize(absmax, offset)
    return QTensor(codes=codes, absmax=qabsmax, nested_absmax=nested,
                   nested_offset=np.asarray(offset, np.float32), shape=(n, k), dtype=dtype,
                   kind=QuantKind.NF4, blocksize=BLOCKSIZE, nested_blocksize=NESTED_BLOCKSIZE)


def quantize_nf4(w: np.ndarray, *, dtype: str | np.dtype | None = None,
                 torch_threads: int = 1) -> QTensor:
    """NF4-quantize w [*lead, N, K] (numpy or jax, any float dtype) into a host-numpy QTensor.

    Each [N, K] matrix is quantized on its own (its own nested offset). `dtype` is the dtype that
    `dequantize` returns (default: w's dtype). `torch_threads` is the torch intra-op thread count
    of the bitsandbytes run to reproduce; it can change the nested offset's last bit (and so,
    rarely, an absmax byte) only for matrices with at least 32768 blocks of 64 (~2.1M elements).
    """
    w = np.asarray(w)
    if w.ndim < 2:
        raise KernelError(f"quantize_nf4: w.shape={w.shape} must be [*lead, N, K] with ndim >= 2")
    name = _dtype_name(w, dtype)
    if w.ndim == 2:
        return _quantize_matrix(w, name, torch_threads)
    lead = w.shape[:-2]
    flat = w.reshape(-1, *w.shape[-2:])
    q = stack([_quantize_matrix(m, name, torch_threads) for m in flat])
    return QTensor(codes=q.codes.reshape(*lead, -1), absmax=q.absmax.reshape(*lead, -1),
                   nested_absmax=q.nested_absmax.reshape(*lead, -1),
                   nested_offset=q.nested_offset.reshape(lead), shape=q.shape, dtype=name,
                   kind=QuantKind.NF4, blocksize=q.blocksize, nested_blocksize=q.nested_blocksize)
