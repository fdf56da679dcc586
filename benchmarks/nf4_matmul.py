"""Fused NF4 / int8 dequant-matmul on the GPU vs bf16 GEMM (XLA) and XLA dequantize-then-dot.

Usage: python benchmarks/nf4_matmul.py [--out DIR] [--commit SHA] [--smoke]
Prints a table last and writes <out>/nf4_matmul-<date>.json (DESIGN.md's shape).

Each timing runs the op on L distinct weights (separate buffers, unrolled) inside one jit and
divides by L, so per-call dispatch is amortized and decode shapes cannot read a weight from L2
(29 MB of NF4 codes per 4096x14336 weight; L2 is 60 MB). TF/s = 2·M·N·K / t. Decode GB/s counts
the quantized weight bytes each variant reads (NF4: codes + uint8 absmax + nested; bf16: 2 B per
weight). For every shape a few tunings of our kernel are tried and the best is reported.
`--smoke` runs tiny shapes in interpret mode on the CPU to check the script itself.

NF4 also times "ours_dequant+dot" (kernels/nf4_dequant.py, then XLA's GEMM; forward and dx) at
M > 64 next to XLA's dequantize-then-dot and the bf16 GEMM, and the dequantization kernel alone
(`--dequant-shapes`, default K=4096 N=14336: a small tuning sweep, µs and GB/s of bytes read +
written) against XLA's dequantize. `--no-fused` skips the fused kernels' sweeps.

`--dispatch` times instead what the model runs: `ops.linear` with its GPU default rule, forward
and forward + dx (`jax.vjp`), on every shape, against the same two baselines (wall clock for
M > 64, GPU time from a profiler trace for the decode shapes, whose calls are host-bound).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gzip
import json
import pathlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fastlora_jax.kernels import int8_matmul as i8
from fastlora_jax.kernels import nf4_dequant as dq
from fastlora_jax.kernels import nf4_matmul as nf4
from fastlora_jax.kernels.nf4_matmul_common import MatmulTuning
from fastlora_jax.kernels.nf4_matmul_mgpu import MgpuTuning, nf4_matmul_mgpu
from fastlora_jax.kernels.weight_stream_mgpu import tile_for
from fastlora_jax.ops.linear import linear
from fastlora_jax.quant import QTensor, QuantKind, dequantize, nf4_block_scales
from fastlora_jax.quant.qtensor import nbytes

import mgpu_trace  # a sibling script: benchmarks/ is on the path when this one runs

T = MatmulTuning
TRAIN = [(8192, 4096, 14336), (8192, 14336, 4096), (8192, 4096, 4096), (8192, 4096, 1024),
         (2048, 4096, 14336), (2048, 14336, 4096), (2048, 4096, 4096), (2048, 4096, 1024)]
DECODE = [(1, 4096, 14336), (16, 4096, 14336), (64, 4096, 14336)]
SWEEP = {
    "train_fwd": [T(128, 256, 128, 8, 3), T(128, 128, 128, 8, 3)],
    "train_bwd": [T(128, 64, 128, 8, 3)],
    "decode1_fwd": [T(16, 64, 256, 4, 3), T(16, 128, 256, 4, 3), T(16, 64, 512, 8, 3)],
    "decode_fwd": [T(16, 64, 256, 4, 3), T(16, 128, 128, 4, 3)],  # best at M=16, M=64
    "decode_bwd": [T(16, 64, 128, 4, 3)],
    "int8_train_fwd": [T(128, 128, 64, 8, 3)],
    "int8_train_bwd": [T(128, 64, 128, 8, 3)],
    "int8_decode_fwd": [T(16, 32, 256, 4, 4), T(16, 64, 256, 4, 3)],
    "int8_decode_bwd": [T(16, 64, 128, 4, 3)],
}
D = dq.DequantTuning
DEQUANT_SWEEP = [D(512, 8), D(256, 4), D(1024, 8), D(2048, 16), D(512, 8, exact=False),
                 D(512, 8, absmax_in_kernel=True), D(512, 8, exact=False, absmax_in_kernel=True)]


def dequant_spec(spec: str) -> dq.DequantTuning:
    """'rows/warps/exact|fast/kernel|xla' -> DequantTuning (the last part: who decodes absmax)."""
    rows, warps, mode, absmax = spec.split("/")
    if mode not in ("exact", "fast") or absmax not in ("kernel", "xla"):
        raise SystemExit(f"--dequant-sweep entry {spec!r}: expected "
                         f"rows/warps/exact|fast/kernel|xla")
    return D(int(rows), int(warps), exact=mode == "exact", absmax_in_kernel=absmax == "kernel")
DEQUANT_TUNING = dq.DEFAULT_TUNING  # the dequant+dot rows use the fastest exact tuning measured
FUSED = True  # --no-fused: skip the fused kernels' sweeps (baselines and dequant+dot only)
MGPU = False  # --mgpu: add the Hopper Mosaic GPU forward to the forward sweeps (sm_90 only)
PROFILE = None  # --profile DIR: one Mosaic GPU decode launch with the in-kernel profiler
DIRECTIONS = ("fwd", "bwd")
TRAIN_TFLOPS_TARGET = 600.0
DECODE_GBS_TARGET = 3000.0


def random_nf4(key: jax.Array, layers: int, n: int, k: int) -> QTensor:
    """L random NF4 matrices [n, k] (random codes and absmax bytes: every byte pattern is valid)."""
    nb = n * k // 64
    k1, k2, k3 = jax.random.split(key, 3)
    return QTensor(codes=jax.random.bits(k1, (layers, n * k // 2), jnp.uint8),
                   absmax=jax.random.bits(k2, (layers, nb), jnp.uint8),
                   nested_absmax=jax.random.uniform(k3, (layers, -(-nb // 256)), jnp.float32,
                                                    0.005, 0.02),
                   nested_offset=jnp.full((layers,), 0.02, jnp.float32), shape=(n, k),
                   dtype="bfloat16", kind=QuantKind.NF4)


def random_int8(key: jax.Array, layers: int, n: int, k: int) -> QTensor:
    k1, k2 = jax.random.split(key)
    codes = jax.random.randint(k1, (layers, n, k), -127, 128, jnp.int32).astype(jnp.int8)
    return QTensor(codes=codes, scale=jax.random.uniform(k2, (layers, n), jnp.float32, 1e-4, 3e-4),
                   shape=(n, k), dtype="bfloat16", kind=QuantKind.INT8)


def scanned(op: Callable) -> Callable:
    """jit(f(x, ws)) running op(x, w_i) for every w_i of the list ws; returns the outputs."""
    return jax.jit(lambda x, ws: [op(x, w) for w in ws])


def unstack(ws, layers: int) -> list:
    """The L layers of a stacked pytree as separate device buffers."""
    return [jax.block_until_ready(jax.tree_util.tree_map(lambda a: a[i] + 0, ws))
            for i in range(layers)]


def time_per_layer(fn: Callable, x: jax.Array, ws, layers: int, reps: int) -> float:
    """Median seconds per layer of fn(x, ws) (compiled and warmed up first). Each rep dispatches
    enough calls back to back to span >= 2 ms before it waits, so that host dispatch overlaps the
    GPU's work (decode calls take tens of microseconds)."""
    jax.block_until_ready(fn(x, ws))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, ws))
    inner = max(1, min(50, int(2e-3 / max(time.perf_counter() - t0, 1e-6)) + 1))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(x, ws) for _ in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) / layers


# The forward baselines as a user writes them: a bf16 product straight from the GEMM (float32
# accumulation on the GPU). A float32 product cast to bf16 times the same forward, but under
# jax.vjp (--dispatch) it makes the dx GEMM take a float32 cotangent and run in float32, 1.6-1.9x
# slower at M = 8192 (measured, dc64a10).
def xla_fwd(x, w):
    return jnp.dot(x, dequantize(w, x.dtype).T)


def xla_bwd(dy, w):
    return jnp.dot(dy, dequantize(w, dy.dtype), preferred_element_type=jnp.float32).astype(dy.dtype)


def bf16_fwd(x, w):
    return jnp.dot(x, w.T)


def bf16_bwd(dy, w):
    return jnp.dot(dy, w, preferred_element_type=jnp.float32).astype(dy.dtype)


class PrintingLog(list):
    """The run's log: each line is also printed when it is added (a run cut by a time limit still
    shows how far it got)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def device_us_per_layer(fn: Callable, x, ws, layers: int) -> tuple[float, dict[str, float]]:
    """GPU time per layer of one fn(x, ws) call from a profiler trace: the sum of the kernel
    durations on the device's stream lines (host dispatch excluded), and µs per kernel name.
    Decode calls are short enough that wall-clock timing measures the host, not the GPU."""
    jax.block_until_ready(fn(x, ws))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(x, ws))
        trace = json.load(gzip.open(next(pathlib.Path(d).rglob("perfetto_trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in meta
               if e.get("name") == "thread_name"}
    per: collections.Counter = collections.Counter()
    for e in events:
        if (e.get("ph") == "X" and "GPU" in procs.get(e.get("pid"), "")
                and threads.get((e.get("pid"), e.get("tid")), "").startswith("Stream")):
            per[e["name"][:60]] += e["dur"] / layers
    if not per:
        gpu_lines = {name for (pid, _), name in threads.items() if "GPU" in procs.get(pid, "")}
        raise RuntimeError(f"no kernel events on a GPU stream line; processes "
                           f"{sorted(set(procs.values()))[:8]}, GPU lines {sorted(gpu_lines)[:12]}")
    return sum(per.values()), dict(per.most_common(6))


def mgpu_prework(x, w):
    """The XLA work around the Mosaic GPU forward's kernel: absmax to float32 (transposed), x split
    into even/odd columns. Timed alone to see how much of a decode call it is."""
    scales = nf4_block_scales(w).reshape(w.shape[0], -1)
    return scales.T, x[:, 0::2], x[:, 1::2]


def mgpu_sweep(m: int, decode: bool) -> list[MgpuTuning]:
    """Mosaic GPU (Hopper) tunings for one M: wgmma N = M rounded up to 8 for decode."""
    if decode:
        tile = tile_for(m)
        return [MgpuTuning(tile_m=tile, max_concurrent_steps=d, blocks_per_step=b, splits=s,
                           acc_scale=a)
                for b, d, s, a in ((4, 4, None, True), (4, 4, None, False), (2, 4, None, False),
                                   (2, 4, None, True), (1, 4, None, True), (4, 4, 4, True),
                                   (8, 4, None, False))
                if not a or tile * b <= 64]
    return [MgpuTuning(tile_m=t, max_concurrent_steps=4) for t in (128, 256)]


def best_of(tunings: list, make: Callable[[MatmulTuning], Callable], x, ws,
            layers: int, reps: int, log: list[str]) -> tuple[float, MatmulTuning | None, Callable]:
    """Fastest tuning (seconds per layer) among those that compile; failures are logged."""
    best = (float("inf"), None, None)
    for t in tunings:
        fn = scanned(make(t))
        try:
            sec = time_per_layer(fn, x, ws, layers, reps)
        except Exception as e:  # a tuning that does not compile (e.g. shared memory) is skipped
            msg = str(e)
            log.append(f"tuning {t} failed: {type(e).__name__}: {msg[:300]} ... {msg[-600:]}")
            continue
        log.append(f"  {t}: {sec * 1e6:.1f} us")
        if sec < best[0]:
            best = (sec, t, fn)
    return best


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.sqrt(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2)))


def bench_dequant(k: int, n: int, interpret: bool, reps: int, log: list[str]) -> list[dict]:
    """nf4_dequantize alone (tuning sweep) vs XLA's dequantize on 4 distinct [n, k] weights; sets
    DEQUANT_TUNING to the fastest exact tuning. GB/s = (codes + absmax + nested read + bf16
    written) / time."""
    global DEQUANT_TUNING
    layers = 4
    ws = unstack(random_nf4(jax.random.PRNGKey(k + n), layers, n, k), layers)
    moved = nbytes(ws[0]) + 2 * n * k
    name = f"nf4 dequant K={k} N={n}"
    log.append(name)
    xla = lambda _, w: dequantize(w, jnp.bfloat16)  # noqa: E731
    t_xla = time_per_layer(scanned(xla), None, ws, layers, reps)
    ref = scanned(xla)(None, ws)[0]
    rows, best_exact = [], (float("inf"), dq.DEFAULT_TUNING)
    for t in DEQUANT_SWEEP[:1] if interpret else DEQUANT_SWEEP:
        fn = scanned(lambda _, w, t=t: dq.nf4_dequantize(w, jnp.bfloat16, tuning=t,
                                                           interpret=interpret))
        try:
            sec = time_per_layer(fn, None, ws, layers, reps)
        except Exception as e:
            log.append(f"  {t} failed: {type(e).__name__}: {str(e)[:300]} ... {str(e)[-600:]}")
            continue
        got = fn(None, ws)[0]
        same = float(jnp.mean(jax.lax.bitcast_convert_type(got, jnp.uint16)
                              != jax.lax.bitcast_convert_type(ref, jnp.uint16)))
        log.append(f"  {t}: {sec * 1e6:.1f} us, {moved / sec / 1e9:.0f} GB/s (XLA "
                   f"{t_xla * 1e6:.1f} us, {moved / t_xla / 1e9:.0f} GB/s); differing weights "
                   f"vs XLA {same:.2e}, rel err {rel_err(got, ref):.2e}")
        if (t.exact or not any(v.exact for v in DEQUANT_SWEEP)) and sec < best_exact[0]:
            best_exact = (sec, t)
        absmax = "kernel" if t.absmax_in_kernel else "xla"
        label = f"{'exact' if t.exact else 'fast'} {absmax}-absmax"
        rows.append(dict(case=f"{name} {label} {t.block_rows}/{t.num_warps}", metric="GB/s",
                         ours=moved / sec / 1e9, baseline_name="XLA dequantize (bf16)",
                         baseline=moved / t_xla / 1e9, ratio=t_xla / sec,
                         target="bandwidth-bound (H200 ~4.8 TB/s peak)", tuning=str(t),
                         us_ours=sec * 1e6, us_xla_dq=t_xla * 1e6, frac_differing_vs_xla=same,
                         bytes_moved=moved))
    DEQUANT_TUNING = best_exact[1]
    log.append(f"  dequant+dot rows use {DEQUANT_TUNING}")
    return rows


def dequant_dot_rows(case: str, direction: str, inp, ws, layers: int, reps: int,
                     interpret: bool, t_xla: float, t_bf16: float, flops: float,
                     log: list[str]) -> list[dict]:
    """"ours_dequant+dot" (nf4_dequant kernel + XLA GEMM) vs XLA dequant+dot and the bf16 GEMM."""
    t = DEQUANT_TUNING
    if direction == "fwd":
        op = lambda a, w: dq.dequant_then_dot(a, w, tuning=t, interpret=interpret)  # noqa: E731
        xla_op = xla_fwd
    else:
        op = lambda a, w: dq.dequant_dx(a, w, tuning=t, interpret=interpret)  # noqa: E731
        xla_op = xla_bwd
    fn = scanned(op)
    sec = time_per_layer(fn, inp, ws, layers, reps)
    err = rel_err(fn(inp, ws)[0], scanned(xla_op)(inp, ws)[0])
    log.append(f"  {direction}: ours_dequant+dot {sec * 1e6:.1f} us ({t}), xla-dq "
               f"{t_xla * 1e6:.1f} us, bf16 {t_bf16 * 1e6:.1f} us, rel err {err:.2e}")
    extra = {"tuning": str(t), "rel_err_vs_xla_dq": err, "us_ours": sec * 1e6,
             "us_xla_dq": t_xla * 1e6, "us_bf16": t_bf16 * 1e6}
    tf = lambda s: flops / s / 1e12  # noqa: E731
    case = f"{case} ours_dequant+dot"
    return [dict(case=case, metric="TF/s", ours=tf(sec), baseline_name="XLA dequant+dot",
                 baseline=tf(t_xla), ratio=t_xla / sec, target="rule: >=1.0x to be default",
                 **extra),
            dict(case=case, metric="TF/s", ours=tf(sec), baseline_name="bf16 GEMM (bf16 weights)",
                 baseline=tf(t_bf16), ratio=t_bf16 / sec, target="ceiling: ~1.0x", **extra)]


def decode_device_times(kind: str, m: int, k: int, n: int, inp, ws, wb, layers: int,
                        make: Callable, triton: MatmulTuning, bf_op: Callable, xla_op: Callable,
                        wbytes_q: int, interpret: bool, log: list[str]) -> list[dict]:
    """Log the GPU time (profiler trace, `device_us_per_layer`) of every Mosaic GPU decode tuning
    next to the bf16 GEMM, XLA's dequantize-then-dot and the first Triton tuning; for NF4 also
    the XLA pre-work alone and the kernel alone; with --profile, an in-kernel profile. Returns
    the rows of the first (default) Mosaic tuning against each baseline and the decode target."""
    timed = [("bf16 GEMM", scanned(bf_op), wb), ("XLA dequant+dot", scanned(xla_op), ws),
             (f"triton {triton}", scanned(make(triton)), ws)]
    tunings = [t for t in mgpu_sweep(m, True) if k // 64 % t.blocks_per_step == 0]
    if kind != "nf4":  # acc_scale is NF4's; int8 always scales its accumulator
        tunings = list(dict.fromkeys(dataclasses.replace(t, acc_scale=False) for t in tunings))
    timed += [(f"mgpu {t}", scanned(make(t)), ws) for t in tunings]
    if kind == "nf4":
        ops = [jax.block_until_ready(jax.jit(nf4.nf4_operands)(w)) for w in ws]
        timed += [("pre-work", scanned(mgpu_prework), ws),
                  (f"mgpu kernel alone {tunings[0]}", scanned(
                      lambda a, op: nf4_matmul_mgpu(a, *op, n, tunings[0], interpret)), ops)]
    if PROFILE is not None:
        out = PROFILE / f"{kind}_M{m}_K{k}_N{n}"
        out.mkdir(parents=True, exist_ok=True)
        t = dataclasses.replace(tunings[0], profile_dir=str(out))
        try:
            jax.block_until_ready(jax.jit(make(t))(inp, ws[0]))
            jax.effects_barrier()  # the profiler writes its trace from a host callback
            log.append(f"  in-kernel profile of {t}:\n{mgpu_trace.format_summary(out)}")
        except Exception as e:  # noqa: BLE001 -- reported, the benchmark goes on
            log.append(f"  in-kernel profile failed: {type(e).__name__}: {str(e)[:300]}")
    us_of = device_times(timed, inp, layers, kind, wbytes_q, log)
    return decode_rows(f"{kind} M={m} K={k} N={n} fwd, GPU time", us_of, f"mgpu {tunings[0]}",
                       f"triton {triton}", wbytes_q, str(tunings[0]))


def decode_dx_device_times(kind: str, m: int, k: int, n: int, dy, ws, wb, layers: int,
                           make: Callable, sweep: list[MatmulTuning], default: MatmulTuning,
                           bf_op: Callable, xla_op: Callable, wbytes_q: int,
                           log: list[str]) -> list[dict]:
    """The decode backward (dx = dy @ W) by GPU time: the dx kernel's default tuning (what the
    model's backward runs) and the sweep's next to the bf16 GEMM and XLA's dequantize-then-dot;
    rows for the default. Wall-clock timing of these ~20-40 us calls measures the host, so the
    ratios of the wall-clock rows are not the GPU's."""
    timed = [("bf16 GEMM", scanned(bf_op), wb), ("XLA dequant+dot", scanned(xla_op), ws)]
    timed += [(f"triton {t}", scanned(make(t)), ws)
              for t in dict.fromkeys([default, *sweep])]
    us_of = device_times(timed, dy, layers, kind, wbytes_q, log)
    return decode_rows(f"{kind} M={m} K={k} N={n} bwd, GPU time", us_of, f"triton {default}",
                       None, wbytes_q, str(default))


def device_times(timed: list, inp, layers: int, kind: str, wbytes_q: int,
                 log: list[str]) -> dict[str, float]:
    """GPU time per layer (us) of each (label, fn, weights) that runs; failures are logged."""
    us_of = {}
    for label, fn, weights in timed:
        try:
            us, per = device_us_per_layer(fn, inp, weights, layers)
        except Exception as e:  # noqa: BLE001 -- reported, the sweep goes on
            log.append(f"  device time {label}: failed {type(e).__name__}: {str(e)[:300]}")
            continue
        us_of[label] = us
        log.append(f"  device time {label}: {us:.1f} us/layer, "
                   f"{wbytes_q / us / 1e3:.0f} GB/s of {kind} bytes; "
                   + "; ".join(f"{name} {v:.1f}" for name, v in per.items()))
    return us_of


def decode_rows(case: str, us_of: dict[str, float], ours_label: str, triton_label: str | None,
                wbytes_q: int, tuning: str) -> list[dict]:
    """Result rows of a decode case from GPU times per label (us per layer): ours against the
    bf16 GEMM, XLA's dequantize-then-dot and the Triton kernel (None: ours is the Triton
    kernel), and ours against the decode bandwidth target. No rows when ours was not timed; a
    baseline that was not timed is left out."""
    ours = us_of.get(ours_label)
    if ours is None:
        return []
    extra = {"tuning": tuning, "us_ours": ours}
    rows = [dict(case=case, metric="us/layer (ratio = baseline / ours)", ours=ours,
                 baseline_name=name, baseline=us_of[label], ratio=us_of[label] / ours,
                 target=target, **extra)
            for name, label, target in (
                ("bf16 GEMM (bf16 weights)", "bf16 GEMM", ">=1.0x"),
                ("XLA dequant+dot", "XLA dequant+dot", "~10x (issue: an order of magnitude)"),
                ("Triton kernel (first tuning)", triton_label, "rule: >=1.0x to be default"))
            if label in us_of]
    gbs = wbytes_q / ours / 1e3
    rows.append(dict(case=case, metric="weight GB/s", ours=gbs, baseline_name="decode target",
                     baseline=DECODE_GBS_TARGET, ratio=gbs / DECODE_GBS_TARGET,
                     target=f">={DECODE_GBS_TARGET:.0f} GB/s (ratio = ours / target)", **extra))
    return rows


def case_inputs(kind: str, m: int, k: int, n: int) -> tuple[int, list, list, jax.Array,
                                                              jax.Array]:
    """(layers, quantized weights, their bf16 copies for the GEMM baseline, x [m, k],
    dy [m, n]) of one case: 8 distinct weights at decode sizes (M <= 64), else 2."""
    layers = 8 if m <= 64 else 2
    kx, kw = jax.random.split(jax.random.PRNGKey(m + k + n))
    stacked = (random_nf4 if kind == "nf4" else random_int8)(kw, layers, n, k)
    wb = unstack(dequantize(stacked, "bfloat16"), layers)
    ws = unstack(stacked, layers)
    del stacked
    return (layers, ws, wb, jax.random.normal(kx, (m, k), jnp.bfloat16),
            jax.random.normal(kx, (m, n), jnp.bfloat16))


def bench_case(kind: str, m: int, k: int, n: int, interpret: bool, reps: int,
               log: list[str]) -> list[dict]:
    decode = m <= 64
    layers, ws, wb, x, dy = case_inputs(kind, m, k, n)
    mod = nf4 if kind == "nf4" else i8
    fused, fused_dx = ((mod.nf4_matmul, mod.nf4_matmul_dx) if kind == "nf4"
                       else (mod.int8_matmul, mod.int8_matmul_dx))
    prefix = "" if kind == "nf4" else "int8_"
    regime = "train" if not decode else ("decode1" if m == 1 and kind == "nf4" else "decode")
    fwd_sweep = SWEEP[f"{prefix}{regime}_fwd"]
    bwd_sweep = SWEEP[f"{prefix}{'train' if regime == 'train' else 'decode'}_bwd"]
    name = f"{kind} M={m} K={k} N={n}"
    log.append(f"{name}")
    flops = 2.0 * m * n * k
    wbytes_q = nbytes(ws[0])
    rows = []
    for direction in DIRECTIONS:
        inp = x if direction == "fwd" else dy
        if direction == "fwd":
            make = lambda t: (lambda a, w: fused(a, w, tuning=t, interpret=interpret))  # noqa: E731
            xla_op, bf_op, sweep = xla_fwd, bf16_fwd, fwd_sweep
        else:
            make = lambda t: (lambda a, w: fused_dx(a, w, tuning=t, interpret=interpret))  # noqa: E731
            xla_op, bf_op, sweep = xla_bwd, bf16_bwd, bwd_sweep
        if direction == "fwd" and MGPU:
            sweep = sweep + mgpu_sweep(m, decode)
        t_xla = time_per_layer(scanned(xla_op), inp, ws, layers, reps)
        t_bf16 = time_per_layer(scanned(bf_op), inp, wb, layers, reps)
        if direction == "fwd" and MGPU and decode:
            rows += decode_device_times(kind, m, k, n, inp, ws, wb, layers, make, sweep[0],
                                        bf_op, xla_op, wbytes_q, interpret, log)
        if direction == "bwd" and MGPU and decode and m <= 16:
            rows += decode_dx_device_times(kind, m, k, n, inp, ws, wb, layers, make, sweep,
                                           mod.BWD_TUNING, bf_op, xla_op, wbytes_q, log)
        case = f"{name} {direction}"
        tf = lambda t: flops / t / 1e12  # noqa: E731
        best_base = min(t_xla, t_bf16)
        if kind == "nf4" and not decode:
            rows += dequant_dot_rows(case, direction, inp, ws, layers, reps, interpret,
                                     t_xla, t_bf16, flops, log)
        if not FUSED:
            continue
        t_ours, tuning, fn = best_of(sweep, make, inp, ws, layers, reps, log)
        err = rel_err(fn(inp, ws)[0], scanned(xla_op)(inp, ws)[0]) if fn else float("nan")
        log.append(f"  {direction}: ours {t_ours * 1e6:.1f} us ({tuning}), xla-dq {t_xla * 1e6:.1f}"
                   f" us, bf16 {t_bf16 * 1e6:.1f} us, rel err {err:.2e}")
        extra = {"tuning": str(tuning), "rel_err_vs_xla_dq": err, "us_ours": t_ours * 1e6,
                 "us_xla_dq": t_xla * 1e6, "us_bf16": t_bf16 * 1e6}
        rows.append(dict(case=case, metric="TF/s", ours=tf(t_ours),
                         baseline_name="faster of bf16 GEMM and XLA dequant+dot",
                         baseline=tf(best_base), ratio=best_base / t_ours,
                         target=(f">=1.0x and >={TRAIN_TFLOPS_TARGET:.0f} TF/s"
                                 if m >= 2048 else ">=1.0x"), **extra))
        rows.append(dict(case=case, metric="TF/s", ours=tf(t_ours), baseline_name="XLA dequant+dot",
                         baseline=tf(t_xla), ratio=t_xla / t_ours, target="rule: >=1.0x to be default",
                         **extra))
        if m <= 16 and direction == "fwd":
            gbs = lambda t: wbytes_q / t / 1e9  # noqa: E731
            rows.append(dict(case=case, metric="weight GB/s", ours=gbs(t_ours),
                             baseline_name="XLA dequant+dot (same NF4 bytes)",
                             baseline=gbs(t_xla),
                             ratio=gbs(t_ours) / DECODE_GBS_TARGET,
                             target=f">={DECODE_GBS_TARGET:.0f} GB/s (ratio = ours / target)",
                             **extra))
    return rows


def with_dx(op: Callable) -> Callable:
    """(x, dy), w -> (op(x, w), dx): the forward and the input gradient, as a training step runs
    them (no gradient for the frozen weight)."""
    def fwd_dx(inp, w):
        x, dy = inp
        y, pull = jax.vjp(lambda a: op(a, w), x)
        return y, pull(dy)[0]
    return fwd_dx


def dispatch_rows(case: str, flops: float, secs: dict[str, float], wbytes_q: int | None,
                  extra: dict) -> list[dict]:
    """Rows of one `--dispatch` case from seconds per layer of "ours", "xla" and "bf16": ours
    against the faster baseline (the issue's TF/s target too at M = 8192, extra["m"]) and
    against XLA's dequantize-then-dot; with wbytes_q (decode forward), ours' weight GB/s
    against the decode target."""
    ours, xla, bf = secs["ours"], secs["xla"], secs["bf16"]
    tf = lambda s: flops / s / 1e12  # noqa: E731
    extra = {**extra, "us_ours": ours * 1e6, "us_xla_dq": xla * 1e6, "us_bf16": bf * 1e6}
    rows = [dict(case=case, metric="TF/s", ours=tf(ours),
                 baseline_name="faster of bf16 GEMM and XLA dequant+dot",
                 baseline=tf(min(xla, bf)), ratio=min(xla, bf) / ours,
                 target=(f">=1.0x and >={TRAIN_TFLOPS_TARGET:.0f} TF/s"
                         if extra.get("m", 0) >= 8192 else ">=1.0x"),
                 **extra),
            dict(case=case, metric="TF/s", ours=tf(ours), baseline_name="XLA dequant+dot",
                 baseline=tf(xla), ratio=xla / ours, target=">=1.0x", **extra)]
    if wbytes_q is not None:
        gbs = wbytes_q / ours / 1e9
        rows.append(dict(case=case, metric="weight GB/s", ours=gbs, baseline_name="decode target",
                         baseline=DECODE_GBS_TARGET, ratio=gbs / DECODE_GBS_TARGET,
                         target=f">={DECODE_GBS_TARGET:.0f} GB/s (ratio = ours / target)",
                         **extra))
    return rows


def dispatch_case(kind: str, m: int, k: int, n: int, reps: int, log: list[str]) -> list[dict]:
    """`ops.linear` as the model calls it (GPU default rule), forward and forward + dx, against
    the bf16 GEMM on bf16 weights and XLA's dequantize-then-dot on the same quantized weights."""
    gpu_time = m <= 64 and jax.default_backend() == "gpu"  # --smoke on the CPU: wall clock
    layers, ws, wb, x, dy = case_inputs(kind, m, k, n)
    name = f"{kind} M={m} K={k} N={n}"
    log.append(f"{name} (model default: ops.linear)")
    rows = []
    for direction in DIRECTIONS:
        if direction == "fwd":
            ops, inp, flops = {"ours": linear, "xla": xla_fwd, "bf16": bf16_fwd}, x, 2.0 * m * n * k
        else:
            ops = {"ours": with_dx(linear), "xla": with_dx(xla_fwd), "bf16": with_dx(bf16_fwd)}
            inp, flops, direction = (x, dy), 4.0 * m * n * k, "fwd+dx"
        secs = {}
        for label, op in ops.items():
            weights = wb if label == "bf16" else ws
            if gpu_time:
                secs[label] = device_us_per_layer(scanned(op), inp, weights, layers)[0] / 1e6
            else:
                secs[label] = time_per_layer(scanned(op), inp, weights, layers, reps)
        got, ref = scanned(ops["ours"])(inp, ws)[0], scanned(ops["xla"])(inp, ws)[0]
        errs = [rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                               jax.tree_util.tree_leaves(ref))]
        log.append(f"  {direction}: ours {secs['ours'] * 1e6:.1f} us, xla-dq "
                   f"{secs['xla'] * 1e6:.1f} us, bf16 {secs['bf16'] * 1e6:.1f} us"
                   f"{' (GPU time)' if gpu_time else ''}, rel err vs xla-dq "
                   + " / ".join(f"{e:.2e}" for e in errs))
        extra = {"m": m, "timing": "GPU time (profiler trace)" if gpu_time else "wall clock",
                 "rel_err_vs_xla_dq": max(errs)}
        rows += dispatch_rows(f"{name} {direction}, model default", flops, secs,
                              nbytes(ws[0]) if m <= 16 and direction == "fwd" else None, extra)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted, on CPU")
    ap.add_argument("--kinds", default="nf4,int8")
    ap.add_argument("--shapes", default=None, help="MxKxN,... (default: the issue's list)")
    ap.add_argument("--quick", action="store_true", help="first tuning of each sweep only")
    ap.add_argument("--mgpu", action="store_true", help="also sweep the Mosaic GPU forward")
    ap.add_argument("--profile", type=pathlib.Path, default=None,
                    help="with --mgpu: also profile one Mosaic decode launch in-kernel, traces "
                         "under this folder (benchmarks/mgpu_trace.py summarises them)")
    ap.add_argument("--directions", default="fwd,bwd")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused kernels' sweeps")
    ap.add_argument("--dequant-shapes", default="4096x14336",
                    help="KxN,... for the dequantization kernel alone ('' to skip)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name: nf4_matmul-<date>-<tag>")
    ap.add_argument("--dispatch", action="store_true",
                    help="time ops.linear's GPU default (what the model runs) instead of sweeps")
    ap.add_argument("--dequant-sweep", default=None,
                    help="rows/warps/exact|fast/kernel|xla,... (default: DEQUANT_SWEEP)")
    args = ap.parse_args()
    global MGPU, DIRECTIONS, FUSED, DEQUANT_SWEEP, PROFILE
    if args.dequant_sweep:
        DEQUANT_SWEEP = [dequant_spec(v) for v in args.dequant_sweep.split(",")]
    MGPU, DIRECTIONS = args.mgpu, tuple(args.directions.split(","))
    PROFILE = args.profile
    FUSED = not args.no_fused
    interpret = args.smoke
    if args.smoke or args.quick:
        for key in SWEEP:
            SWEEP[key] = SWEEP[key][:1]
    if args.smoke:
        shapes = [(16, 128, 64), (1, 128, 64), (64, 128, 64), (256, 256, 128)]
    elif args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = TRAIN + DECODE
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"nf4_matmul-{date}{'-' + args.tag if args.tag else ''}.json"
    log: list[str] = PrintingLog()
    rows: list[dict] = []
    dequant_shapes = ([(128, 64)] if args.smoke else
                      [tuple(int(v) for v in s.split("x")) for s in args.dequant_shapes.split(",")
                       if s])
    def write() -> None:
        result = {"benchmark": "nf4_matmul", "date": date,
                  "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                  "commit": commit, "rows": rows, "log": log}
        path.write_text(json.dumps(result, indent=1))

    if "nf4" in args.kinds.split(","):
        for k, n in dequant_shapes:
            rows += bench_dequant(k, n, interpret, 2 if args.smoke else 5, log)
            write()
    for kind in args.kinds.split(","):
        for m, k, n in shapes:
            if kind == "int8" and not args.shapes and (m, k, n) not in shapes[:2] + shapes[-3:]:
                continue  # int8: two training shapes and the decode shapes
            try:
                reps = 2 if args.smoke else 5
                rows += (dispatch_case(kind, m, k, n, reps, log) if args.dispatch
                         else bench_case(kind, m, k, n, interpret, reps, log))
            except Exception as e:
                log.append(f"{kind} {(m, k, n)} failed: {type(e).__name__}: {str(e)[:500]}")
            write()
    print(f"\n{'case':44s} {'metric':12s} {'ours':>9s} {'baseline':>9s} {'ratio':>6s}  baseline")
    for r in rows:
        print(f"{r['case']:44s} {r['metric']:12s} {r['ours']:9.1f} {r['baseline']:9.1f} "
              f"{r['ratio']:6.2f}  {r['baseline_name']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
