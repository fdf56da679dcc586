"""The Mosaic GPU kernels that a GPU default runs, lowered for CUDA on the CPU, are pinned by a
hash of each kernel's module text (printed without debug info: no source locations).

The hashes were taken from the code before the kernels and their dispatch were pruned: the
kernels the GPU measured and tested are the ones shipped. A change that alters one of
these modules on purpose updates its hash here and says why in the commit message (and the GPU
tests must run again on a Hopper GPU). `python -m tests.kernels.test_mosaic_lowering` prints the
current hashes.
"""

from __future__ import annotations

import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
from jax.experimental.mosaic.gpu import core as mosaic_core
from jax.experimental.mosaic.gpu import dialect as mosaic_dialect

from fastlora_jax.kernels.flash_attention import flash_attention
from fastlora_jax.kernels.nf4_matmul_mgpu import nf4_matmul_mosaic
from fastlora_jax.ops import Impl
from fastlora_jax.quant import quantize_nf4


def mosaic_modules(lowered) -> list[str]:
    """The module text of every Mosaic GPU kernel in a lowered program, in program order, without
    debug info and without the per-process dump counter."""
    texts = []

    def walk(op) -> None:
        for region in op.regions:
            for block in region:
                for inner in block:
                    if (inner.name == "stablehlo.custom_call" and "mosaic_gpu"
                            in str(inner.attributes["call_target_name"])):
                        config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
                        texts.append(_module_text(ir.StringAttr(config["module"]).value_bytes))
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    return texts


def _module_text(bytecode: bytes) -> str:
    context = jax_mlir.make_ir_context()
    mosaic_dialect.register_dialect(context)
    with context:
        context.allow_unregistered_dialects = True
        module = mosaic_core._run_serde_pass(ir.Module.parse(bytecode), serialize=False)
        text = module.operation.get_asm(enable_debug_info=False)
    return re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', 'mosaic_gpu.dump_basename = ""', text)


def _digest(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]


# Attention on Hopper (what ops.attention's GPU default runs for segment ids / softcap, and any
# flash_attention call there): (q shape, kv heads, options, with backward).
ATTENTION = {
    "causal_gqa_d128": ((2, 1024, 8, 128), 2, dict(causal=True), True),
    "packed_d128": ((2, 1024, 8, 128), 2, dict(causal=True, segments=True), True),
    "ragged_window_softcap_d64": ((1, 700, 4, 64), 2,
                                  dict(causal=True, sliding_window=200, softcap=20.0, scale=0.1,
                                       seq_kv=1000), True),
    "noncausal_mqa_d64": ((1, 512, 4, 64), 1, dict(causal=False), True),
    "forward_d256_softcap": ((1, 512, 4, 256), 2, dict(causal=True, softcap=20.0), False),
}


def _attention_modules(name: str) -> list[str]:
    q_shape, kv_heads, options, backward = ATTENTION[name]
    options = dict(options)
    batch, seq, heads, head_dim = q_shape
    seq_kv = options.pop("seq_kv", seq)
    segments = options.pop("segments", False)
    q = jax.ShapeDtypeStruct(q_shape, jnp.bfloat16)
    k = jax.ShapeDtypeStruct((batch, seq_kv, kv_heads, head_dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def attend(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg if segments else None,
                               impl=Impl.PALLAS_MOSAIC, interpret=False, **options)

    def run(q, k, v, seg):
        if not backward:
            return attend(q, k, v, seg)
        o, pull = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
        return pull(o)

    return mosaic_modules(jax.jit(run).trace(q, k, k, seg).lower(lowering_platforms=("cuda",)))


# The NF4 decode forward on Hopper (ops.linear's GPU default for bf16 x, M <= 16): (M, K, N), with
# the default tuning (MosaicMatmulTuning.for_m: tile_m from M; 4, 2 or 1 blocks per step,
# whichever divides K / 64; absmax applied to the accumulator).
NF4 = {"m1_k4096": (1, 4096, 1024), "m16_k4160": (16, 4160, 520), "m9_k128": (9, 128, 200)}


def _nf4_modules(name: str) -> list[str]:
    m, k, n = NF4[name]
    w = jax.tree_util.tree_map(jnp.asarray, quantize_nf4(
        np.random.default_rng(0).standard_normal((n, k), dtype=np.float32) * 0.05,
        dtype="bfloat16"))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    lowered = jax.jit(lambda x, w: nf4_matmul_mosaic(x, w, interpret=False)).trace(
        x, w).lower(lowering_platforms=("cuda",))
    return mosaic_modules(lowered)


# sha256[:16] of each kernel's module text (forward, dq, dk/dv for the attention cases).
EXPECTED = {
    "attention/causal_gqa_d128": ['b15cc5568832b77c', '4134b2743ed369c4', 'd4eee067bcfb9871'],
    "attention/forward_d256_softcap": ['6b0bcb21ab1e7363'],
    "attention/noncausal_mqa_d64": ['9228d2c4291fb849', 'e3e1a1f3202d9488', '8b8bd98d03f03e60'],
    "attention/packed_d128": ['36e281cbcffe9ffa', '5e60efcac5c01312', '8d2e0ef5611ab34d'],
    "attention/ragged_window_softcap_d64":
        ['92f193977c191779', '068ed6346a8b09c6', 'ac2e246af63fe89c'],
    "nf4/m16_k4160": ['a9d0b20dc00cf883'],
    "nf4/m1_k4096": ['1b382eaf67566046'],
    "nf4/m9_k128": ['b736442167bdb935'],
}


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_kernels_unchanged(name: str) -> None:
    assert _digest(_attention_modules(name)) == EXPECTED[f"attention/{name}"]


@pytest.mark.parametrize("name", sorted(NF4))
def test_nf4_decode_kernel_unchanged(name: str) -> None:
    assert _digest(_nf4_modules(name)) == EXPECTED[f"nf4/{name}"]


if __name__ == "__main__":
    for case in sorted(ATTENTION):
        print(f'    "attention/{case}":\n        {_digest(_attention_modules(case))},')
    for case in sorted(NF4):
        print(f'    "nf4/{case}": {_digest(_nf4_modules(case))},')
