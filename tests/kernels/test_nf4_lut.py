"""The NF4 prmt lookup (kernels/nf4_matmul_lut.py), the split-K decode and the Mosaic GPU kernel,
on CPU.

The PTX itself runs only on the GPU (tests/gpu); here its algorithm is replayed in numpy on
random words, so a wrong table byte or selector fails in CI.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import KernelError
from fastlora_jax.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from fastlora_jax.kernels.nf4_matmul_common import MatmulTuning
from fastlora_jax.kernels.nf4_matmul_decode import decode_forward, default_splits
from fastlora_jax.kernels.nf4_matmul_lut import (ASM_PLAIN, ASM_SCALED, NF4_BF16_BITS,
                                                 emulate_prmt_lut, emulate_prmt_planes,
                                                 nf4_pairs, pairs_to_bf16, pairs_to_f32,
                                                 scale_pairs)
from fastlora_jax.kernels.nf4_matmul_mgpu import MgpuTuning
from fastlora_jax.quant import NF4_MAP, nf4_block_scales, quantize_nf4


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


def test_default_splits_reach_the_program_target() -> None:
    assert default_splits(224, 16) == 2      # 4096 x 14336: 224 tiles of 64 rows
    assert default_splits(16, 16) == 16      # 1024 rows: split K 16 ways
    assert default_splits(16, 5) == 1        # an odd step count cannot be split


@pytest.mark.parametrize("m,fma", [(1, True), (3, False)])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_k_decode_matches_reference(m: int, fma: bool, splits: int) -> None:
    rng = np.random.default_rng(splits + m)
    k, n = 512, 40
    w = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(
        rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16"))
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    codes = jnp.asarray(w.codes).reshape(n, k // 2)
    scales = nf4_block_scales(w).reshape(n, k // 64)
    t = MatmulTuning(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=2)
    y = decode_forward(x, codes, scales, n, t, interpret=True, fma=fma, splits=splits)
    ref = nf4_matmul_reference(x, w)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    err = jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
    assert float(err) <= 1e-2


def test_prmt_planes_replay_all_byte_pairs() -> None:
    table = NF4_BF16_BITS.astype(np.int64)
    for word in range(0, 65536, 7):  # a stride through every high/low nibble combination
        hi, lo = emulate_prmt_planes(word)
        b0, b1 = word & 0xFF, word >> 8
        assert hi == table[b0 >> 4] | table[b1 >> 4] << 16, hex(word)
        assert lo == table[b0 & 0xF] | table[b1 & 0xF] << 16, hex(word)


# The Mosaic GPU kernel under Mosaic's CPU interpreter (a jnp decode replaces the inline PTX,
# and A goes through shared memory: the interpreter's wgmma takes no register operand).
@pytest.mark.parametrize("m,k,n,tuning", [(3, 256, 72, None),
                                          (20, 384, 130, MgpuTuning(tile_m=8, splits=3)),
                                          (33, 128, 64, MgpuTuning(tile_m=16,
                                                                   max_concurrent_steps=2)),
                                          (20, 512, 130, MgpuTuning(tile_m=8, blocks_per_step=4)),
                                          (3, 256, 72, MgpuTuning(tile_m=8, blocks_per_step=2,
                                                                  splits=2)),
                                          (20, 512, 130, MgpuTuning(tile_m=8, blocks_per_step=2,
                                                                    acc_scale=True)),
                                          (17, 384, 72, MgpuTuning(tile_m=24, splits=3,
                                                                   acc_scale=True))])
def test_mgpu_kernel_interpreted_matches_reference(m, k, n, tuning) -> None:
    rng = np.random.default_rng(m + n)
    w = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(
        rng.standard_normal((n, k), dtype=np.float32) * 0.05, dtype="bfloat16"))
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    y = nf4_matmul(x, w, tuning=tuning or MgpuTuning(tile_m=8), interpret=True)
    ref = nf4_matmul_reference(x, w)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    err = jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
    assert float(err) <= 1e-2


def test_mgpu_default_splits_aim_at_eight_ctas_per_sm() -> None:
    from fastlora_jax.kernels.nf4_matmul_mgpu import default_splits as mgpu_default_splits
    assert mgpu_default_splits(224, 32) == 8    # 4096 x 14336, 2 blocks per step: 1792 CTAs
    assert mgpu_default_splits(224, 8) == 8
    assert mgpu_default_splits(224, 33) == 1    # an odd step count cannot be split
    assert mgpu_default_splits(2, 256) == 16    # capped at 16


def test_mgpu_tuning_checks() -> None:
    with pytest.raises(KernelError, match="tile_m=12"):
        MgpuTuning(tile_m=12)
    with pytest.raises(KernelError, match="blocks_per_step=3"):
        MgpuTuning(blocks_per_step=3)


def test_row_planes_with_permuted_x_give_the_block_dot_product() -> None:
    """ASM_ROW_PLANES (replayed) on each thread's 8 bytes, placed where _decode_rows places them
    (thread c's pair q -> plane columns 8q + 2c, +1), against x's planes permuted by
    permute_x_planes: the dot product of one 32-byte block equals the dequantized one."""
    from fastlora_jax.kernels.nf4_matmul_lut import emulate_row_planes
    from fastlora_jax.kernels.nf4_matmul_mgpu import permute_x_planes

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
