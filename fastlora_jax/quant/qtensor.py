"""`QTensor`: a frozen, quantized weight matrix as a JAX pytree, and its reference dequantization.

Layouts (`*lead` = optional leading axes, e.g. a stacked layer axis, shared by every array leaf;
the logical per-matrix shape is `shape = (N, K) = (out, in)`):

NF4 (bitsandbytes' layout with double quantization, blocksize 64, nested blocksize 256):
    codes          uint8   [*lead, ceil(N*K/2)]        row-major flattened weight, element 2i in the
                                                       HIGH nibble of byte i, 2i+1 in the low nibble
    absmax         uint8   [*lead, nblocks]            nblocks = ceil(N*K/64); 8-bit dynamic-map codes
                                                       of (absmax - nested_offset)
    nested_absmax  float32 [*lead, ceil(nblocks/256)]
    nested_offset  float32 [*lead]
    w[i] = NF4_MAP[q[i]] * (dyn[absmax[i//64]] * nested_absmax[i//64//256] + nested_offset)

On a mesh (`tiled=True`, made by `tile`), the same NF4 bytes are viewed as rows, which is what a
mesh shards without splitting a block (K a multiple of 64):
    codes          uint8   [*lead, N, K/2]
    absmax         uint8   [*lead, N, K/64]
    nested_absmax, nested_offset as above (a nested block may span rows: they stay whole)

INT8 (weight-only, per output channel):
    codes          int8    [*lead, N, K]
    scale          float32 [*lead, N]                  w = codes * scale[:, None]

Fields a kind does not use are None.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import KernelError
from fastlora_jax.quant.maps import DYNAMIC_MAP, NF4_MAP

Array = jax.Array | np.ndarray


class QuantKind(enum.Enum):
    """Which quantized format a QTensor holds."""

    NF4 = "nf4"
    INT8 = "int8"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QTensor:
    """A quantized [*lead, N, K] weight; see the module docstring for the array layouts."""

    codes: Array
    absmax: Array | None = None
    nested_absmax: Array | None = None
    nested_offset: Array | None = None
    scale: Array | None = None
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))
    kind: QuantKind = dataclasses.field(default=QuantKind.NF4, metadata=dict(static=True))
    blocksize: int = dataclasses.field(default=64, metadata=dict(static=True))
    nested_blocksize: int = dataclasses.field(default=256, metadata=dict(static=True))
    tiled: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def lead(self) -> tuple[int, ...]:
        """The leading (stacking) axes shared by every array leaf."""
        flat = self.kind is QuantKind.NF4 and not self.tiled
        return tuple(self.codes.shape[:-1] if flat else self.codes.shape[:-2])

    @property
    def numel(self) -> int:
        """Elements of one logical matrix: N * K."""
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        """NF4 absmax blocks per matrix: ceil(N*K / blocksize)."""
        return -(-self.numel // self.blocksize)

    def __getitem__(self, index: int | slice | jax.Array) -> QTensor:
        """Index the leading axes (every array leaf together), e.g. `q[layer]`."""
        if not self.lead:
            raise KernelError(f"QTensor of shape={self.shape} has no leading axes to index; "
                              f"expected lead != (), found lead={self.lead}")
        return jax.tree_util.tree_map(lambda a: a[index], self)


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "absmax", "nested_absmax", "nested_offset", "scale"],
    meta_fields=["shape", "dtype", "kind", "blocksize", "nested_blocksize", "tiled"],
)


def can_tile(q: QTensor) -> bool:
    """Whether an NF4 QTensor's rows hold whole blocks (K % blocksize == 0), so `tile` applies."""
    return q.kind is QuantKind.NF4 and q.shape[1] % q.blocksize == 0


def tile(q: QTensor) -> QTensor:
    """The row view of an NF4 QTensor (module docstring): a reshape, no byte changes.

    INT8 is already [*lead, N, K] and is returned as is."""
    if q.kind is QuantKind.INT8 or q.tiled:
        return q
    if not can_tile(q):
        raise KernelError(f"tile: K = {q.shape[1]} is not a multiple of blocksize={q.blocksize}; "
                          f"a row of this weight does not hold whole blocks")
    n, k = q.shape
    lead = q.lead
    return dataclasses.replace(q, codes=_reshape(q.codes, (*lead, n, k // 2)),
                               absmax=_reshape(q.absmax, (*lead, n, k // q.blocksize)), tiled=True)


def _reshape(a: Array | jax.ShapeDtypeStruct, shape: tuple[int, ...]) -> Array | jax.ShapeDtypeStruct:
    """a.reshape(shape), also for abstract arrays (compile-only planning uses those)."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, a.dtype)
    return a.reshape(shape)


def untile(q: QTensor) -> QTensor:
    """The flat (bitsandbytes) layout of a QTensor made by `tile`."""
    if not q.tiled:
        return q
    lead = q.lead
    return dataclasses.replace(q, codes=q.codes.reshape(*lead, -1),
                               absmax=q.absmax.reshape(*lead, -1), tiled=False)


def nf4_block_scales(q: QTensor) -> jax.Array:
    """Decoded per-block absmax of an NF4 QTensor: float32 [*lead, nblocks].

    absmax = dyn[qabsmax] * nested_absmax[b // nested_blocksize] + nested_offset, in float32 with
    one rounding per operation (bitsandbytes' dequantize_blockwise, then `+= offset`).
    """
    q = untile(q)
    absmax = jnp.asarray(q.absmax)
    nb, nbs = absmax.shape[-1], q.nested_blocksize
    # uint8 codes always index inside the 256-entry map: "clip" spares the gather its bounds mask.
    dyn = jnp.take(jnp.asarray(DYNAMIC_MAP), absmax.astype(jnp.int32), axis=0, mode="clip")
    # nested_absmax[b // nbs] as a broadcast over [nb / nbs, nbs] rather than a second gather.
    pad = -nb % nbs
    if pad:
        dyn = jnp.pad(dyn, [(0, 0)] * (dyn.ndim - 1) + [(0, pad)])
    nested = jnp.asarray(q.nested_absmax, jnp.float32)[..., None]
    scaled = (dyn.reshape(*dyn.shape[:-1], -1, nbs) * nested).reshape(*dyn.shape[:-1], -1)
    scaled = scaled[..., :nb] if pad else scaled
    # Eager evaluation rounds the multiply and the add separately, as bitsandbytes does. Under
    # jit XLA may contract them into one FMA (the CPU backend does too): a few absmax values then
    # differ in the last bit, within every tolerance used (kernels/nf4_dequant.py's exact path
    # rounds twice, so it matches eager dequantize bit for bit).
    return scaled + jnp.asarray(q.nested_offset, jnp.float32)[..., None]


def dequantize(q: QTensor, dtype: str | jnp.dtype | None = None) -> jax.Array:
    """Reference dequantization: [*lead, N, K] in `dtype` (default q.dtype); float32 math inside."""
    out_dtype = jnp.dtype(dtype if dtype is not None else q.dtype)
    q = untile(q)
    n, k = q.shape
    if q.kind is QuantKind.INT8:
        w = jnp.asarray(q.codes).astype(jnp.float32) * jnp.asarray(q.scale, jnp.float32)[..., None]
        return w.astype(out_dtype)
    if q.kind is not QuantKind.NF4:
        raise KernelError(f"QTensor kind={q.kind!r} is not one of {list(QuantKind)}")
    lead = q.lead
    codes = jnp.asarray(q.codes)
    table = jnp.asarray(NF4_MAP)
    scales = nf4_block_scales(q)
    nb = scales.shape[-1]
    if (n * k) % q.blocksize == 0:
        # Common case, one fusion: per 64-block, high nibbles are the even elements and low
        # nibbles the odd ones; scale each plane, then interleave (stack + reshape is a bitcast).
        c = codes.reshape(*lead, nb, q.blocksize // 2).astype(jnp.int32)
        s = scales[..., None]
        # Nibbles always index inside the 16-entry table: "clip" spares the gathers a bounds mask.
        hi = jnp.take(table, c >> 4, axis=0, mode="clip") * s
        lo = jnp.take(table, c & 0xF, axis=0, mode="clip") * s
        return jnp.stack([hi, lo], axis=-1).reshape(*lead, n, k).astype(out_dtype)
    # Unpack: element 2i is the high nibble of byte i, 2i+1 the low nibble.
    nibbles = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*lead, -1)[..., : n * k]
    values = jnp.take(table, nibbles.astype(jnp.int32), axis=0, mode="clip")
    padded = nb * q.blocksize
    values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, padded - n * k)])
    w = values.reshape(*lead, nb, q.blocksize) * scales[..., None]
    return w.reshape(*lead, padded)[..., : n * k].reshape(*lead, n, k).astype(out_dtype)


def _stack_leaves(leaves: list[Array]) -> Array:
    if all(isinstance(a, np.ndarray) for a in leaves):
        return np.stack(leaves)
    return jnp.stack([jnp.asarray(a) for a in leaves])


def stack(qtensors: list[QTensor] | tuple[QTensor, ...]) -> QTensor:
    """Stack QTensors of identical metadata along a new leading axis (host numpy stays numpy)."""
    if not qtensors:
        raise KernelError("stack(qtensors): expected at least one QTensor, found an empty list")
    first = qtensors[0]
    meta0 = jax.tree_util.tree_structure(first)
    for i, q in enumerate(qtensors[1:], start=1):
        if jax.tree_util.tree_structure(q) != meta0:
            raise KernelError(f"stack(qtensors): qtensors[{i}] has metadata "
                              f"(shape={q.shape}, dtype={q.dtype}, kind={q.kind}, "
                              f"blocksize={q.blocksize}) but qtensors[0] has (shape={first.shape}, "
                              f"dtype={first.dtype}, kind={first.kind}, blocksize={first.blocksize})")
        for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(q)):
            if a.shape != b.shape:
                raise KernelError(f"stack(qtensors): qtensors[{i}] has a leaf of shape {b.shape}, "
                                  f"expected {a.shape} as in qtensors[0]")
    return jax.tree_util.tree_map(lambda *leaves: _stack_leaves(list(leaves)), *qtensors)


def nbytes(q: QTensor) -> int:
    """Bytes held by the array leaves of `q` (all leading axes included)."""
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(q)))
