"""The NF4 dequantization kernel (kernels/nf4_dequant.py) and dequant_then_dot, interpreted on CPU.

The exact path equals `quant.dequantize` bit for bit (same float32 operations, one rounding to
the output dtype); the PTX lookup is replayed in numpy, and assembled by ptxas where it exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_dequant import (ASM_EXACT, NF4_F32_BITS, DequantTuning, dequant_dx,
                                              dequant_then_dot, emulate_f32_lookup,
                                              nf4_dequantize)
from fastlora_jax.kernels.nf4_matmul import nf4_matmul_reference
from fastlora_jax.ops import defaults
from fastlora_jax.quant import QTensor, QuantKind, dequantize, quantize_int8, quantize_nf4

SMALL = DequantTuning(block_rows=64, num_warps=4)


def _quantized(n: int, k: int, seed: int, dtype: str = "bfloat16") -> QTensor:
    rng = np.random.default_rng(seed)
    w = quantize_nf4(rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype=dtype)
    return jax.tree_util.tree_map(jnp.asarray, w)


def _random_bytes(n: int, k: int, seed: int) -> QTensor:
    """Random codes and absmax bytes (every nibble and all 256 dynamic-map entries occur)."""
    nb = -(-n * k // 64)
    rng = np.random.default_rng(seed)
    return QTensor(codes=jnp.asarray(rng.integers(0, 256, (n * k + 1) // 2, dtype=np.uint8)),
                   absmax=jnp.asarray(rng.integers(0, 256, nb, dtype=np.uint8)),
                   nested_absmax=jnp.asarray(rng.uniform(0.005, 0.02, -(-nb // 256)), jnp.float32),
                   nested_offset=jnp.asarray(0.02, jnp.float32), shape=(n, k), dtype="bfloat16",
                   kind=QuantKind.NF4)


def _same_bits(a: jax.Array, b: jax.Array) -> bool:
    assert a.shape == b.shape and a.dtype == b.dtype
    return bool(jnp.all(jax.lax.bitcast_convert_type(a, jnp.uint16)
                        == jax.lax.bitcast_convert_type(b, jnp.uint16)))


# Odd N, K from one block to 7 blocks per row; 37 x 448 = 259 blocks: several programs of 64
# blocks, a masked last tile and two nested-absmax blocks of 256.
# Called eagerly, so XLA's absmax decode is not FMA-contracted either.
@pytest.mark.parametrize("n,k", [(7, 64), (33, 192), (37, 448), (16, 1024)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kernel_equals_dequantize_bit_for_bit(n: int, k: int, dtype: str) -> None:
    for w in (_quantized(n, k, seed=n + k), _random_bytes(n, k, seed=n * k)):
        assert _same_bits(nf4_dequantize(w, dtype, tuning=SMALL, interpret=True),
                          dequantize(w, dtype))


def test_at_a_real_size_under_jit() -> None:
    """4M weights (65536 absmax blocks): under jit XLA fuses the absmax's dyn * nested + offset
    into an FMA, which may flip a few bf16 roundings against the eager reference."""
    w = _quantized(1024, 4096, seed=0)
    ref = dequantize(w)
    via_xla = jax.jit(nf4_dequantize)(w)
    differ = jax.lax.bitcast_convert_type(via_xla, jnp.uint16) != jax.lax.bitcast_convert_type(
        ref, jnp.uint16)
    assert float(jnp.mean(differ)) < 1e-5


def test_default_dtype_and_ragged_last_block() -> None:
    """N*K % 64 != 0 (K = 40): the ragged tail is padded and cut; dtype defaults to w.dtype."""
    for n, k in [(3, 40), (5, 100)]:
        w = _quantized(n, k, seed=k, dtype="float16")
        out = nf4_dequantize(w, tuning=SMALL, interpret=True)
        assert out.dtype == jnp.float16 and _same_bits(out, dequantize(w))


def test_f32_prmt_lookup_replay() -> None:
    """Every byte in every position of the word decodes to the float32 NF4 value of its nibbles."""
    words = [b * 0x01010101 for b in range(256)]
    words += [int(v) for v in np.random.default_rng(0).integers(0, 2**32, 300, dtype=np.uint64)]
    for word in words:
        want = [int(NF4_F32_BITS[(word >> (4 * i)) & 0xF]) for i in range(8)]
        assert emulate_f32_lookup(word) == want, hex(word)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="needs ptxas")
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_asm_assembles(name: str, tmp_path) -> None:
    body, nops = ASM_EXACT[name], 9
    body = re.sub(r"\$(\d+)", lambda m: f"%r{m.group(1)}", body)
    loads = "\n".join(f"ld.param.u32 %r{i}, [p + {4 * i}];" for i in range(nops))
    stores = "\n".join(f"st.global.u32 [%rd1 + {4 * i}], %r{i};" for i in range(nops))
    ptx = (".version 8.0\n.target sm_90\n.address_size 64\n"
           ".visible .entry k(.param .u64 o, .param .align 4 .b8 p[64]) {\n"
           ".reg .b32 %r<16>;\n.reg .b64 %rd<2>;\nld.param.u64 %rd1, [o];\n"
           f"{loads}\n{body}\n{stores}\nret;\n}}\n")
    (tmp_path / "k.ptx").write_text(ptx)
    r = subprocess.run(["ptxas", "-arch=sm_90", str(tmp_path / "k.ptx"), "-o",
                        str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_errors_name_the_value() -> None:
    w = _quantized(8, 64, seed=1)
    with pytest.raises(KernelError, match="dtype='float32'"):
        nf4_dequantize(w, jnp.float32, interpret=True)
    with pytest.raises(KernelError, match="leading axes"):
        nf4_dequantize(jax.tree_util.tree_map(lambda a: a[None], w), interpret=True)
    w8 = jax.tree_util.tree_map(jnp.asarray, quantize_int8(np.ones((8, 64), np.float32)))
    with pytest.raises(KernelError, match="w.kind=int8"):
        nf4_dequantize(w8, interpret=True)
    with pytest.raises(KernelError, match="block_rows=100"):
        DequantTuning(block_rows=100, num_warps=4)
    with pytest.raises(KernelError, match=r"dy.shape=\(2, 9\)"):
        dequant_dx(jnp.ones((2, 9), jnp.bfloat16), w, interpret=True)


@pytest.mark.parametrize("m,k,n", [(5, 320, 37), (80, 192, 48)])
def test_dequant_then_dot_forward_and_grad(m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m + n)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    w = _quantized(n, k, seed=m * n)
    y = dequant_then_dot(x, w, tuning=SMALL, interpret=True)
    y_ref = nf4_matmul_reference(x, w)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    # Same bf16 weights and the same XLA dot: equal up to the dot's own summation order.
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=1e-2, atol=1e-2)

    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    def loss(f):
        return lambda x: (f(x).astype(jnp.float32) * ct).sum()
    g = jax.grad(loss(lambda x: dequant_then_dot(x, w, tuning=SMALL, interpret=True)))(x)
    g_ref = jax.grad(loss(lambda x: nf4_matmul_reference(x, w)))(x)
    assert g.shape == x.shape and g.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_default_tuning_and_rule() -> None:
    """The kernel's tuning is the table's; ops.linear uses the kernel by default only where it
    measured faster: NF4 with 64-weight blocks, bf16 / fp16 x, 64 < M <= 2048 (below, the fused
    kernels; never on the CPU)."""
    assert DequantTuning.measured() == DequantTuning(*defaults.DEQUANT_BLOCKS)
    w = _quantized(8, 64, seed=2)
    assert defaults.dequant_applies(w.kind, w.blocksize, jnp.float16)
    assert not defaults.dequant_applies(w.kind, w.blocksize, jnp.float32)
    assert not defaults.dequant_applies(QuantKind.INT8, 64, jnp.bfloat16)
    assert not defaults.dequant_applies(w.kind, 128, jnp.bfloat16)
    assert defaults.DEQUANT_MAX_M == 2048
