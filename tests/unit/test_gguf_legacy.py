"""Our legacy GGUF quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) write the `gguf` package's bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from fastlora_jax.quant import gguf_legacy, gguf_rows

TYPES = tuple(gguf_legacy.QUANTIZE)
# the offset added before truncating, per type (Q8_0 rounds instead: see _contraction_sensitive)
OFFSET = {"Q4_0": (-8, 8.5), "Q5_0": (-16, 16.5), "Q4_1": (15, 0.5), "Q5_1": (31, 0.5)}


def _edge_blocks() -> np.ndarray:
    """Blocks of 32 that decide ties and zeros: all zero, -0.0 first, +-max ties in both orders,
    negative max, constant blocks, exact halves after scaling, tiny and huge scales."""
    rows = [np.zeros(32), np.r_[-0.0, np.zeros(31)], np.r_[1.0, -1.0, np.zeros(30)],
            np.r_[-1.0, 1.0, np.linspace(-0.5, 0.5, 30)], -np.abs(np.linspace(0.1, 3.0, 32)),
            np.full(32, 0.25), np.full(32, -7.0), (np.arange(32) - 16) * 0.5,
            np.r_[127.0, np.arange(31) + 0.5], np.r_[-127.0, -(np.arange(31) + 0.5)],
            np.r_[8.0, np.arange(-15, 16) * 0.5], np.r_[-16.0, np.arange(-15, 16) * 0.5],
            np.linspace(-1, 1, 32) * 1e-30, np.linspace(-1, 1, 32) * 6e4]
    return np.stack(rows).astype(np.float32)


def _contraction_sensitive(rng: np.random.Generator, qtype: str, n: int) -> np.ndarray:
    """Blocks holding values where computing `(x - min) * (1/d) + offset` as one fused
    multiply-add truncates to another level than the package's rounded product plus offset (what
    an FMA-contracting compiler gets wrong): candidates are the float32 neighbours of every level
    boundary, kept where float64 arithmetic (the fused result) disagrees. Up to `n` blocks."""
    scale, offset = OFFSET[qtype]
    blocks = []
    for _ in range(64 * n):
        top = np.float32(rng.uniform(0.01, 2))
        low = np.float32(-top if scale < 0 else -rng.uniform(0, 2))
        base = np.float32(0) if scale < 0 else low
        d = (top / np.float32(scale)) if scale < 0 else (top - low) / np.float32(scale)
        inv = np.float32(1) / d
        levels = np.arange(abs(scale) * 2 + 2) - offset
        near = (levels / np.float64(inv) + base).astype(np.float32)
        cand = (near.view(np.int32)[:, None] + np.arange(-48, 49)).ravel().view(np.float32)
        cand = cand[(cand > low) & (cand < top)]
        rounded = np.trunc((cand - base) * inv + np.float32(offset))
        fused = np.trunc(((cand - base).astype(np.float64) * inv + offset).astype(np.float32))
        hits = cand[rounded != fused][:30]
        if len(hits):
            filler = np.full(30 - len(hits), top / 2, np.float32)
            blocks.append(np.concatenate([[top, low], hits, filler]).astype(np.float32))
        if len(blocks) == n:
            break
    return np.stack(blocks) if blocks else np.zeros((0, 32), np.float32)


def _inputs(seed: int, qtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((2048, 32)) * rng.uniform(1e-3, 10, (2048, 1))
    parts = [_edge_blocks(), gauss.astype(np.float32),
             rng.integers(-8, 9, (256, 32)).astype(np.float32) * np.float32(0.125)]
    if qtype in OFFSET:
        parts.append(_contraction_sensitive(rng, qtype, 256))
    return np.concatenate(parts)  # one block per row


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_equal_the_gguf_package(qtype):
    x = _inputs(0, qtype)
    want = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    ours = gguf_rows.quantize_rows(x, qtype)
    assert ours.shape == want.shape
    bad = ~(ours.reshape(-1, gguf_legacy.BLOCK_BYTES[qtype]) ==
            want.reshape(-1, gguf_legacy.BLOCK_BYTES[qtype])).all(axis=1)
    assert not bad.any(), (qtype, np.nonzero(bad)[0][:8])


def test_sensitive_inputs_exist():
    """The contraction-sensitive blocks above are really in the inputs (else that check is moot)."""
    rng = np.random.default_rng(0)
    assert all(len(_contraction_sensitive(rng, t, 8)) == 8 for t in OFFSET)


def test_chunking_and_padding_do_not_change_the_bytes():
    x = np.random.default_rng(1).standard_normal((37, 96)).astype(np.float32)  # 111 blocks
    for qtype in ("Q8_0", "Q5_0"):
        assert np.array_equal(gguf_rows.quantize_rows(x, qtype, chunk_blocks=64),
                              gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]))


def test_pieces_cover_every_block_once():
    for n in (1, 31, 32, 33, 1000, 16384, 40000):
        pieces = gguf_rows._pieces(n, 1024, 5)
        assert [p[0] for p in pieces] == list(np.cumsum([0] + [p[1] for p in pieces[:-1]]))
        assert sum(p[1] for p in pieces) == n and all(p[1] <= p[2] for p in pieces)
        assert {p[2] for p in pieces} <= {1024 >> k for k in range(6)}
        assert {p[2] for p in gguf_rows._pieces(n, 1024, 0)} == {1024}


def test_rows_not_filling_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_rows.quantize_rows(np.zeros((2, 48), np.float32), "Q8_0")
