"""Flash attention on the GPU: our Pallas kernels vs cuDNN and XLA, forward and forward+backward.

Usage: python benchmarks/attention.py [--out DIR] [--commit SHA] [--quick] [--impls LIST]
       [--cases LIST] [--sweep LIST] [--profile DIR] [--smoke]
--impls: comma-separated implementations of ours to time, from pallas_mosaic (the Hopper
default) and pallas_triton (default: both). Every case also times cuDNN and, up to 8K tokens,
XLA (jax.nn.dot_product_attention), in the same process, round-robin.
--cases: substrings of case names to run (default all). --sweep: implementations to tile-sweep
on the 4K causal case. --profile DIR: instead of timing, run each Mosaic case once with the
in-kernel profiler and print the summaries (benchmarks/mgpu_trace.py). --smoke: one tiny case,
interpreted, on the CPU (checks the script).
Writes benchmarks/results/attention-<date>.json (common.py's envelope) and prints the table.
TF/s counts 4·B·H·Tq·Tk·D FLOPs forward (2 matmuls) over the *visible* (query, key) pairs only
(causal: about half; packed: within documents; window: inside it), and 3.5× that for
forward+backward (the backward does 2.5× the forward's matmul work).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
import mgpu_trace
from fastlora_jax.kernels.attention_mask import dense_mask
from fastlora_jax.kernels.flash_attention import (MosaicBlockSizes, TritonBlockSizes,
                                                  flash_attention)
from fastlora_jax.ops import Impl

TOKENS = 16384
HEADS, KV_HEADS, HEAD_DIM = (common.LLAMA3_8B[k] for k in ("num_attention_heads",
                                                             "num_key_value_heads", "head_dim"))


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape (Llama-3-8B's heads unless named). docs > 1: equal-length packed
    documents per row."""

    name: str
    batch: int
    seq: int
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    docs: int = 1
    window: int | None = None
    softcap: float | None = None
    target_fwd_bwd: float | None = None  # the ratio over cuDNN asked for (common.TARGETS)

    def visible_pairs(self) -> int:
        """Number of visible (query, key) pairs per (batch row, head)."""
        i = np.arange(self.seq)
        if self.docs > 1:
            length = self.seq // self.docs
            return self.docs * length * (length + 1) // 2
        count = i + 1
        if self.window is not None:
            count = np.minimum(count, self.window)
        return int(count.sum())

    def flops_fwd(self) -> float:
        return 4.0 * self.batch * self.heads * self.head_dim * self.visible_pairs()


CASES = [
    *(Case(f"causal_gqa32/8_d128_s{s}", batch=TOKENS // s, seq=s,
           target_fwd_bwd=common.TARGETS["attention fwd+bwd vs cuDNN"])
      for s in (2048, 4096, 8192, 16384)),
    Case("packed_8docs_s4096", batch=4, seq=4096, docs=8,
         target_fwd_bwd=common.TARGETS["attention packed vs cuDNN"]),
    Case("window4096_s16384", batch=1, seq=16384, window=4096),
    Case("d256_softcap50_gqa16/8_s4096", batch=4, seq=4096, heads=16, kv_heads=8, head_dim=256,
         softcap=50.0),
]
SMOKE = Case("smoke_packed_s128", batch=1, seq=128, heads=2, kv_heads=1, head_dim=64, docs=2)


def _inputs(c: Case):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (c.batch, c.seq, c.heads, c.head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (c.batch, c.seq, c.kv_heads, c.head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (c.batch, c.seq, c.kv_heads, c.head_dim), jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    seg = None
    if c.docs > 1:
        seg = jnp.broadcast_to(jnp.repeat(jnp.arange(c.docs, dtype=jnp.int32), c.seq // c.docs),
                               (c.batch, c.seq))
    return q, k, v, do, seg


def attention_fn(impl: str, c: Case, seg: jax.Array | None,
                 blocks: TritonBlockSizes | MosaicBlockSizes | None = None) -> Callable:
    """attention(q, k, v) of one implementation: ours ('pallas_mosaic', 'pallas_triton', with
    `blocks` of that backend or the default tiles), 'cudnn' or 'xla'."""
    if impl in (Impl.PALLAS_MOSAIC.value, Impl.PALLAS_TRITON.value):
        tiles = ({"mosaic_blocks": blocks} if isinstance(blocks, MosaicBlockSizes)
                 else {"triton_blocks": blocks})
        return lambda q, k, v: flash_attention(
            q, k, v, causal=True, segment_ids=seg, sliding_window=c.window, softcap=c.softcap,
            impl=impl, **tiles)
    # cuDNN / XLA have no softcap: they run the same shape without it (an upper bound for them).
    mask = None
    if seg is not None:
        mask = dense_mask(c.seq, c.seq, causal=True, sliding_window=None, q_segment_ids=seg,
                          kv_segment_ids=seg)
    window = None if c.window is None else (c.window - 1, 0)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=mask is None, local_window_size=window,
        implementation=impl)


def _time_once(f: Callable, args: tuple, inner: int) -> float:
    """Seconds per call over `inner` back-to-back calls of a jitted f."""
    t0 = time.perf_counter()
    for _ in range(inner):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def measure_interleaved(impls: list[str], c: Case, blocks=None, reps: int = 5, inner: int = 5
                        ) -> dict[str, tuple[float | None, float | None, jax.Array | None, str]]:
    """{impl: (fwd TF/s, fwd+bwd TF/s, output, error message)}.

    Every implementation is compiled first; then the timing rounds go round-robin over them
    (median of `reps` rounds), so a clock or thermal drift during the run hits all alike
    instead of favouring whichever ran first.
    """
    q, k, v, do, seg = _inputs(c)
    results, ready = {}, {}
    for impl in impls:
        attn = attention_fn(impl, c, seg, blocks)
        fwd = jax.jit(attn)

        def fwd_bwd(q, k, v, do, attn=attn):
            o, vjp = jax.vjp(attn, q, k, v)
            return vjp(do)

        fwd_bwd = jax.jit(fwd_bwd)
        try:
            out = jax.block_until_ready(fwd(q, k, v))
            jax.block_until_ready(fwd_bwd(q, k, v, do))
        except Exception as e:  # noqa: BLE001 -- a baseline that cannot run this shape is reported
            message = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            results[impl] = (None, None, None, message)
            continue
        ready[impl] = (fwd, fwd_bwd, out)
    times = {impl: ([], []) for impl in ready}
    for _ in range(reps):
        for impl, (fwd, fwd_bwd, _) in ready.items():
            times[impl][0].append(_time_once(fwd, (q, k, v), inner))
            times[impl][1].append(_time_once(fwd_bwd, (q, k, v, do), inner))
    for impl, (t_f, t_fb) in times.items():
        results[impl] = (c.flops_fwd() / statistics.median(t_f) / 1e12,
                         3.5 * c.flops_fwd() / statistics.median(t_fb) / 1e12, ready[impl][2], "")
    return {impl: results[impl] for impl in impls}


def profile(c: Case, directory: pathlib.Path) -> str:
    """One fwd+bwd of the Mosaic kernels with the in-kernel profiler on (kernels/mgpu_profile.py):
    a trace per kernel launch under directory/<case>; returns their summary."""
    out = directory / c.name.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    blocks = dataclasses.replace(MosaicBlockSizes.for_head_dim(c.head_dim), profile_dir=str(out))
    q, k, v, do, seg = _inputs(c)
    attn = attention_fn(Impl.PALLAS_MOSAIC.value, c, seg, blocks)
    jax.block_until_ready(jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))(q, k, v, do))
    jax.effects_barrier()  # the profiler writes its traces from host callbacks
    return mgpu_trace.format_summary(out)


def sweep_options(impl: str, head_dim: int) -> list:
    """A few tilings of one backend around its default."""
    if impl == Impl.PALLAS_MOSAIC.value:
        base = MosaicBlockSizes.for_head_dim(head_dim)
        return [base, dataclasses.replace(base, block_kv=64),
                dataclasses.replace(base, num_stages=3),
                dataclasses.replace(base, num_stages_bwd=2)]
    base = TritonBlockSizes.for_head_dim(head_dim)
    return [base, dataclasses.replace(base, block_q=128, block_kv=128, num_warps=8),
            dataclasses.replace(base, block_q=64, block_kv=64, num_warps=4),
            dataclasses.replace(base, block_q_dq=128, block_kv_dq=64, block_q_dkv=64,
                                block_kv_dkv=128, num_warps_bwd=8)]


def sweep(c: Case, impl: str) -> list[dict]:
    """Time each tiling of `sweep_options` on one case; print and return them."""
    rows = []
    for blocks in sweep_options(impl, c.head_dim):
        f, fb, _, err = measure_interleaved([impl], c, blocks)[impl]
        print(f"sweep {c.name} {blocks}: fwd {f} fwd+bwd {fb} {err}", flush=True)
        rows.append(dict(blocks=dataclasses.asdict(blocks), fwd=f, fwd_bwd=fb, error=err))
    return rows


def case_rows(c: Case, results: dict) -> list[dict]:
    """Rows of one case: the best of ours by fwd+bwd against cuDNN and XLA, fwd and fwd+bwd."""
    ours = [i for i in results if i.startswith("pallas") and results[i][1] is not None]
    best = max(ours, key=lambda i: results[i][1], default=None)
    rows = []
    for metric, idx, target in (("fwd TF/s", 0, None), ("fwd+bwd TF/s", 1, c.target_fwd_bwd)):
        for base in ("cudnn", "xla"):
            rows.append(common.row(c.name, metric, results[best][idx] if best else None, base,
                                   results[base][idx],
                                   target=target if base == "cudnn" else None, ours_impl=best,
                                   note=results[base][3] or None))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS)
    parser.add_argument("--commit", default="")
    parser.add_argument("--impls", default="pallas_mosaic,pallas_triton")
    parser.add_argument("--quick", action="store_true", help="first two cases only")
    parser.add_argument("--cases", default="",
                        help="comma-separated substrings: run the cases whose name has one")
    parser.add_argument("--sweep", default="", help="implementations to tile-sweep (4K causal)")
    parser.add_argument("--profile", type=pathlib.Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="one tiny case on the CPU")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = set(impls) - {Impl.PALLAS_MOSAIC.value, Impl.PALLAS_TRITON.value}
    if unknown:
        parser.error(f"--impls: unknown {sorted(unknown)}; choose from pallas_mosaic, "
                     f"pallas_triton")
    cases = [SMOKE] if args.smoke else CASES[:2] if args.quick else CASES
    if args.cases:
        cases = [c for c in cases if any(part in c.name for part in args.cases.split(","))]
    if args.profile:
        for c in cases:
            try:
                summary = profile(c, args.profile)
            except Exception as e:  # noqa: BLE001 -- e.g. no shared memory left for it
                summary = f"failed: {type(e).__name__}: {str(e)[:300]}"
            print(f"== {c.name}\n{summary}", flush=True)
        return
    doc = common.jax_envelope("attention", commit=args.commit, errors={})
    table = []
    for c in cases:
        runs = [*impls, "cudnn"] + (["xla"] if c.seq <= 8192 else [])
        results = measure_interleaved(runs, c, reps=2 if args.smoke else 5)
        if c.seq > 8192:
            results["xla"] = (None, None, None, "skipped: dense scores exceed memory")
        for impl, r in results.items():
            print(c.name, impl, r[:2], r[3], flush=True)
        ref_out = results["cudnn"][2] if results["cudnn"][2] is not None else results["xla"][2]
        for impl in impls:
            if ref_out is not None and c.softcap is None and results[impl][2] is not None:
                err = float(jnp.max(jnp.abs(results[impl][2].astype(jnp.float32)
                                            - ref_out.astype(jnp.float32))))
                print(f"{c.name} {impl}: max |ours - baseline| = {err:.3e}", flush=True)
        doc["rows"] += case_rows(c, results)
        table += [(c.name, metric, {i: r[idx] for i, r in results.items()})
                  for metric, idx in (("fwd TF/s", 0), ("fwd+bwd TF/s", 1))]
        doc["errors"][c.name] = {i: r[3] for i, r in results.items() if r[3]}
        path = common.write(doc, args.out)
    if args.sweep:
        doc["sweep"] = [sweep(CASES[1], impl) for impl in args.sweep.split(",")]
        path = common.write(doc, args.out)
    names = sorted({i for _, _, r in table for i in r})
    print(f"\n{doc['device']}, jax {doc['versions']['jax']}, commit {doc['commit']}; TF/s "
          f"(useful FLOPs)")
    print(f"{'case':34s} {'metric':13s} " + " ".join(f"{i:>14s}" for i in names))
    for name, metric, r in table:
        cells = " ".join(f"{r[i]:14.1f}" if r.get(i) else f"{'-':>14s}" for i in names)
        print(f"{name:34s} {metric:13s} {cells}")
    print(common.markdown_table(doc["rows"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
