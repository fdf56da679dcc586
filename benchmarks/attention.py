"""Flash attention on the GPU: our Pallas kernels vs cuDNN and XLA, forward and forward+backward.

Usage: python benchmarks/attention.py [--out DIR] [--commit SHA] [--quick] [--backends LIST]
       [--sweep LIST] [--cases LIST]
--backends: comma-separated, from triton, mosaic_gpu and Mosaic variants written
mosaic_gpu+<flag>+... with flags (BlockSizes fields): fwd (Mosaic forward + Triton backward),
seg (Mosaic kernels take segment ids), fused (the fused one-kernel Mosaic backward, dq by TMA
reduce-add), pair (with fused: its two warpgroups share one dq product), pp (forward pingpong
schedule), grp (dk/dv summed over the GQA group in the kernel), nopp / nogrp / noseg (turn a
default off), s3 / fs3 (3-slot TMA ring in the backward / forward), rev / norev (query tiles
last-first), ov (backward: exponentials overlap the do/v product), st (dk/dv kernel: lse and delta
through the TMA ring); the older names mosaic_gpu_fwd, _seg, _fused, _fused_pair,
_fused_seg still work.
--cases: substrings of case names to run (default all). Default backends: a representative set.
Prints a table last and writes benchmarks/results/attention-<date>.json (DESIGN.md's shape).
TF/s counts 4·B·H·Tq·Tk·D FLOPs forward (2 matmuls) over the *visible* (query, key) pairs only
(causal: about half; packed: within documents; window: inside it), and 3.5× that for
forward+backward (the backward does 2.5× the forward's matmul work).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.kernels import flash_attention as fa
from fastlora_jax.kernels.attention_reference import attention_mask

import mgpu_trace  # a sibling script: benchmarks/ is on the path when this one runs

TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape. docs > 1: equal-length packed documents per row."""

    name: str
    batch: int
    seq: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    docs: int = 1
    window: int | None = None
    softcap: float | None = None
    target_fwd_bwd: float | None = None  # ratio over cuDNN the issue asks for

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
    *(Case(f"causal_gqa32/8_d128_s{s}", batch=TOKENS // s, seq=s, target_fwd_bwd=1.0)
      for s in (2048, 4096, 8192, 16384)),
    Case("packed_8docs_s4096", batch=4, seq=4096, docs=8, target_fwd_bwd=10.0),
    Case("window4096_s16384", batch=1, seq=16384, window=4096),
    Case("d256_softcap50_gqa16/8_s4096", batch=4, seq=4096, heads=16, kv_heads=8, head_dim=256,
         softcap=50.0),
]


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


# Mosaic GPU variants: "mosaic_gpu+<flag>+<flag>..." sets these BlockSizes fields.
FLAGS = {"fwd": ("mgpu_backward", False), "seg": ("mgpu_segments", True),
         "fused": ("mgpu_fused_bwd", True), "pair": ("mgpu_fused_pair_dq", True),
         "pp": ("mgpu_pingpong", True), "grp": ("mgpu_dkv_group", True),
         "nopp": ("mgpu_pingpong", False), "nogrp": ("mgpu_dkv_group", False),
         "noseg": ("mgpu_segments", False), "s3": ("mgpu_num_stages_bwd", 3),
         "fs3": ("mgpu_num_stages", 3),
         "rev": ("mgpu_reverse_tiles", True), "norev": ("mgpu_reverse_tiles", False),
         "ov": ("mgpu_bwd_overlap", True), "st": ("mgpu_bwd_stats_tma", True)}
ALIASES = {"mosaic_gpu_fwd": "mosaic_gpu+fwd", "mosaic_gpu_seg": "mosaic_gpu+seg",
           "mosaic_gpu_fused": "mosaic_gpu+fused", "mosaic_gpu_fused_pair": "mosaic_gpu+fused+pair",
           "mosaic_gpu_fused_seg": "mosaic_gpu+fused+seg"}


def variant_overrides(backend: str) -> dict:
    """BlockSizes overrides of a Mosaic GPU variant name ({} for a plain backend)."""
    name = ALIASES.get(backend, backend)
    base, *flags = name.split("+")
    if flags and base != "mosaic_gpu":
        raise SystemExit(f"variant flags only apply to mosaic_gpu, got {backend!r}")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise SystemExit(f"unknown variant flag(s) {unknown} in {backend!r}; "
                         f"known: {sorted(FLAGS)}")
    return dict(FLAGS[f] for f in flags)


def _attn_fn(impl: str, c: Case, seg: jax.Array | None,
             block_sizes: fa.BlockSizes | None = None) -> Callable:
    """attention(q, k, v) for one implementation ('ours:<backend>', 'cudnn', 'xla').

    'ours:mosaic_gpu+<flags>' is a Mosaic GPU variant (`variant_overrides`; the head_dim 256
    case runs the Triton backward in every Mosaic variant).
    """
    if impl.startswith("ours"):
        backend = impl.split(":")[1]
        overrides = variant_overrides(backend)
        if overrides:
            block_sizes = dataclasses.replace(
                block_sizes or fa.BlockSizes.for_head_dim(c.head_dim), **overrides)
            backend = "mosaic_gpu"
        return lambda q, k, v: fa.flash_attention(
            q, k, v, causal=True, segment_ids=seg, sliding_window=c.window, softcap=c.softcap,
            block_sizes=block_sizes, backend=backend)
    # cuDNN / XLA have no softcap: they run the same shape without it (an upper bound for them).
    mask = None
    if seg is not None:
        mask = attention_mask(c.seq, c.seq, causal=True, sliding_window=None, q_segment_ids=seg,
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


def measure_interleaved(impls: list[str], c: Case,
                        block_sizes: fa.BlockSizes | None = None, reps: int = 5, inner: int = 5
                        ) -> dict[str, tuple[float | None, float | None, jax.Array | None, str]]:
    """{impl: (fwd TF/s, fwd+bwd TF/s, output, error message)}.

    Every implementation is compiled first; then the timing rounds go round-robin over them
    (median of `reps` rounds), so a clock or thermal drift during the run hits all alike
    instead of favouring whichever ran first.
    """
    q, k, v, do, seg = _inputs(c)
    results, ready = {}, {}
    for impl in impls:
        attn = _attn_fn(impl, c, seg, block_sizes)
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


def measure(impl: str, c: Case, block_sizes: fa.BlockSizes | None = None
            ) -> tuple[float | None, float | None, jax.Array | None, str]:
    """(fwd TF/s, fwd+bwd TF/s, output, error message) of one implementation."""
    return measure_interleaved([impl], c, block_sizes)[impl]


def profile(c: Case, backend: str, directory: pathlib.Path) -> str:
    """One fwd+bwd of a Mosaic GPU variant with the in-kernel profiler on (kernels/mgpu_profile.py):
    a trace per kernel launch under directory/<case>/<backend>; returns their summary."""
    out = directory / c.name.replace("/", "_") / backend
    out.mkdir(parents=True, exist_ok=True)
    bs = dataclasses.replace(fa.BlockSizes.for_head_dim(c.head_dim), mgpu_profile_dir=str(out))
    q, k, v, do, seg = _inputs(c)
    attn = _attn_fn(f"ours:{backend}", c, seg, bs)  # applies the variant's flags to bs
    jax.block_until_ready(jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))(q, k, v, do))
    jax.effects_barrier()  # the profiler writes its traces from host callbacks
    return mgpu_trace.format_summary(out)


def sweep(c: Case, backend: str) -> list[dict]:
    """Try a few tilings of one case; print and return them."""
    rows = []
    base = fa.BlockSizes.for_head_dim(c.head_dim)
    options = [
        base,
        dataclasses.replace(base, mgpu_block_kv=64),
        dataclasses.replace(base, mgpu_num_stages=3),
        dataclasses.replace(base, mgpu_block_kv=64, mgpu_num_stages=3),
    ] if backend == "mosaic_gpu" else [
        base,  # the fused backward's tiles: at head_dim 128 only 64 x 64 fits shared memory;
        dataclasses.replace(base, mgpu_num_stages_bwd=3),  # 3 stages: dq in 64-column halves
        dataclasses.replace(base, mgpu_fused_pair_dq=True),
        dataclasses.replace(base, mgpu_fused_pair_dq=True, mgpu_num_stages_bwd=3),
    ] if backend.startswith("mosaic_gpu_fused") else [
        base,
        dataclasses.replace(base, block_q=128, block_kv=128, num_warps=8),
        dataclasses.replace(base, block_q=64, block_kv=64, num_warps=4),
        dataclasses.replace(base, num_stages=3),
        dataclasses.replace(base, block_q_dq=128, block_kv_dq=64, block_q_dkv=64,
                            block_kv_dkv=128, num_warps_bwd=8),
        dataclasses.replace(base, block_q_dq=64, block_kv_dq=32, block_q_dkv=32,
                            block_kv_dkv=64, num_warps_bwd=4),
    ]
    for bs in options:
        f, fb, _, err = measure(f"ours:{backend}", c, bs)
        print(f"sweep {c.name} {bs}: fwd {f} fwd+bwd {fb} {err}", flush=True)
        rows.append(dict(block_sizes=dataclasses.asdict(bs), fwd=f, fwd_bwd=fb, error=err))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--commit", default="")
    parser.add_argument("--backends", default="")
    parser.add_argument("--quick", action="store_true", help="first two cases only")
    parser.add_argument("--cases", default="",
                        help="comma-separated substrings: run the cases whose name has one")
    parser.add_argument("--sweep", default="", help="backends (comma-separated) to tile-sweep")
    parser.add_argument("--profile", type=pathlib.Path, default=None,
                        help="instead of timing: run each Mosaic variant's fwd+bwd once with the "
                             "in-kernel profiler, traces under this folder, and print summaries")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    backends = (args.backends.split(",") if args.backends
                else [*(b.value for b in fa.Backend if not b.interpreted),
                      "mosaic_gpu+nopp+nogrp+noseg"])
    cases = CASES[:2] if args.quick else CASES
    if args.cases:
        cases = [c for c in cases if any(part in c.name for part in args.cases.split(","))]
    for b in backends:
        variant_overrides(b)  # fail before any timing on a misspelt variant
    if args.profile:
        for c in cases:
            for b in backends:
                if not b.startswith("mosaic_gpu"):
                    continue
                try:
                    summary = profile(c, b, args.profile)
                except Exception as e:  # noqa: BLE001 -- e.g. no shared memory left for it
                    summary = f"failed: {type(e).__name__}: {str(e)[:300]}"
                print(f"== {c.name} {b}\n{summary}", flush=True)
        return
    rows, table, extra = [], [], {}
    doc = dict(benchmark="attention", date=datetime.date.today().isoformat(),
               device=jax.devices()[0].device_kind, jax_version=jax.__version__, commit=commit,
               rows=rows, errors=extra)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"attention-{doc['date']}.json"
    for c in cases:
        impls = [*(f"ours:{b}" for b in backends), "cudnn"]
        if c.seq <= 8192:
            impls.append("xla")
        results = measure_interleaved(impls, c)
        if c.seq > 8192:
            results["xla"] = (None, None, None, "skipped: dense scores exceed memory")
        for impl, r in results.items():
            print(c.name, impl, r[:2], r[3], flush=True)
        ref_out = results["cudnn"][2] if results["cudnn"][2] is not None else results["xla"][2]
        ours = [i for i in results if i.startswith("ours") and results[i][1] is not None]
        best = max(ours, key=lambda i: results[i][1], default=None)
        for impl in ours:
            if ref_out is not None and c.softcap is None:
                err = float(jnp.max(jnp.abs(results[impl][2].astype(jnp.float32)
                                            - ref_out.astype(jnp.float32))))
                print(f"{c.name} {impl}: max |ours - baseline| = {err:.3e}", flush=True)
        for metric, idx, target in (("fwd TF/s", 0, None), ("fwd+bwd TF/s", 1, c.target_fwd_bwd)):
            for base in ("cudnn", "xla"):
                b = results[base][idx]
                o = results[best][idx] if best else None
                rows.append(dict(case=c.name, metric=metric, ours=o, ours_impl=best,
                                 baseline_name=base, baseline=b,
                                 ratio=(o / b) if (o and b) else None,
                                 target=target if base == "cudnn" else None,
                                 note=results[base][3] or None))
            table.append((c.name, metric, {i: r[idx] for i, r in results.items()}))
        extra[c.name] = {i: r[3] for i, r in results.items() if r[3]}
        path.write_text(json.dumps(doc, indent=1))  # after every case: partial runs keep data
    if args.sweep:
        extra["sweep"] = [sweep(CASES[1], b) for b in args.sweep.split(",")]
    path.write_text(json.dumps(doc, indent=1))
    impls = sorted({i for _, _, r in table for i in r})
    print(f"\n{doc['device']}, jax {doc['jax_version']}, commit {commit}; TF/s (useful FLOPs)")
    print(f"{'case':34s} {'metric':13s} " + " ".join(f"{i:>14s}" for i in impls))
    for name, metric, r in table:
        cells = " ".join(f"{r[i]:14.1f}" if r.get(i) else f"{'-':>14s}" for i in impls)
        print(f"{name:34s} {metric:13s} {cells}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
