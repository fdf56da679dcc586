"""The NF4 prmt lookup (kernels/nf4_lookup.py) on the CPU, and the column order of the Mosaic
kernel's row decode.

The PTX itself runs only on the GPU (tests/gpu); here its algorithm is replayed in numpy on
random words, so a wrong table byte or selector fails in CI.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fastlora_jax.kernels.nf4_lookup import (ASM_PLAIN, ASM_SCALED, NF4_BF16_BITS,
                                             emulate_prmt_lut, emulate_prmt_planes,
                                             emulate_row_planes, nf4_pairs, pairs_to_bf16,
                                             pairs_to_f32, scale_pairs)
from fastlora_jax.kernels.nf4_matmul_mgpu import permute_x_planes
from fastlora_jax.quant import NF4_MAP


def test_prmt_lookup_replay_matches_the_nf4_table() -> None:
    rng = np.random.default_rng(0)
    words = [int(v) for v in rng.integers(0, 2**32, 300, dtype=np.uint64)]
    words += [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, 0x77777777, 0x88888888]
    for word in words:
        pairs = emulate_prmt_lut(word)
        for i in range(4):
            b = (word >> (8 * i)) & 0xFF
            want = int(NF4_BF16_BITS[b >> 4]) | int(NF4_BF16_BITS[b & 0xF]) << 16
            assert pairs[i] == want, (hex(word), i)
    assert "$8" in ASM_SCALED and "$5" not in ASM_PLAIN


def test_jnp_pairs_planes_and_scale() -> None:
    codes = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8).reshape(8, 32)
    hi, lo = pairs_to_f32(nf4_pairs(codes, None, use_asm=False))
    c = np.arange(256).reshape(8, 32)
    table = np.asarray(jnp.asarray(NF4_MAP).astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(hi), table[c >> 4])
    np.testing.assert_array_equal(np.asarray(lo), table[c & 0xF])
    s = jnp.linspace(0.5, 2.0, 8, dtype=jnp.float32)[:, None]
    hb, lb = pairs_to_bf16(nf4_pairs(codes, scale_pairs(s), use_asm=False))
    np.testing.assert_allclose(np.asarray(hb, np.float32), NF4_MAP[c >> 4] * np.asarray(s),
                               rtol=1e-2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lb, np.float32), NF4_MAP[c & 0xF] * np.asarray(s),
                               rtol=1e-2, atol=1e-6)


def test_prmt_planes_replay_all_byte_pairs() -> None:
    table = NF4_BF16_BITS.astype(np.int64)
    for word in range(0, 65536, 7):  # a stride through every high/low nibble combination
        hi, lo = emulate_prmt_planes(word)
        b0, b1 = word & 0xFF, word >> 8
        assert hi == table[b0 >> 4] | table[b1 >> 4] << 16, hex(word)
        assert lo == table[b0 & 0xF] | table[b1 & 0xF] << 16, hex(word)


def test_row_planes_with_permuted_x_give_the_block_dot_product() -> None:
    """ASM_ROW_PLANES (replayed) on each thread's 8 bytes, placed where _decode_rows places them
    (thread c's pair q -> plane columns 8q + 2c, +1), against x's planes permuted by
    permute_x_planes: the dot product of one 32-byte block equals the dequantized one."""
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, 32, dtype=np.uint8)
    x = rng.standard_normal(64).astype(np.float32)
    nf4 = np.asarray(NF4_MAP, np.float32)
    want = float(nf4[codes >> 4] @ x[0::2] + nf4[codes & 0xF] @ x[1::2])

    def bf16_pair(word: int) -> tuple[float, float]:
        return tuple((np.array([word & 0xFFFF, word >> 16], np.uint32) << 16).view(np.float32))

    hi, lo = np.zeros(32, np.float32), np.zeros(32, np.float32)
    for c in range(4):
        pairs = emulate_row_planes(codes[8 * c:8 * c + 8].tobytes())
        for q in range(4):
            hi[8 * q + 2 * c:8 * q + 2 * c + 2] = bf16_pair(pairs[2 * q])
            lo[8 * q + 2 * c:8 * q + 2 * c + 2] = bf16_pair(pairs[2 * q + 1])
    xe = np.asarray(permute_x_planes(jnp.asarray(x[0::2])[None]))[0]
    xo = np.asarray(permute_x_planes(jnp.asarray(x[1::2])[None]))[0]
    got = float(hi @ xe + lo @ xo)
    assert abs(got - want) <= 1e-2 * (abs(want) + 1e-3)
