"""Quantized weight-only matmuls (NF4, int8) on the GPU: ours vs the bf16 GEMM on bf16 weights and
XLA's dequantize-then-dot on the same quantized weights.

Usage: python benchmarks/nf4_matmul.py [--out DIR] [--commit SHA] [--tag TAG] [--kinds nf4,int8]
       [--shapes MxKxN,...] [--directions fwd,bwd] [--dispatch] [--mosaic] [--quick]
       [--dequant-shapes KxN,...] [--profile DIR] [--smoke]
Shapes default to Llama-3-8B's projections (common.LLAMA3_8B) at M = 8192 and 2048 (training)
and M = 1, 16, 64 (decode).

`--dispatch` times what the model runs: `ops.linear` with its default rule, forward and forward
+ dx (`jax.vjp`), on every shape, against the two baselines. Otherwise, per shape:
- decode (M <= 64): the fused kernels' tunings (Triton; with --mosaic also the Hopper Mosaic
  GPU forward, NF4) forward, and NF4's dx kernel backward;
- training (M > 64, NF4): our dequantization kernel + XLA's GEMM (what ops.linear runs up to
  M = 2048), forward and dx;
and the dequantization kernel alone (`--dequant-shapes`, a small tuning sweep; GB/s of bytes
read + written) against XLA's dequantize.
Timing: each call runs the op on L distinct weights (separate buffers, unrolled) inside one jit,
divided by L, so dispatch is amortized and decode shapes cannot read a weight from L2. On the GPU
decode shapes are timed by the GPU clock (a profiler trace: their calls are shorter than their
host dispatch), others by the wall clock. TF/s = 2·M·N·K / t; decode GB/s counts the quantized
weight bytes read. `--smoke`: tiny shapes, interpreted, on the CPU (checks the script).
Writes <out>/nf4_matmul-<date>[-<tag>].json (common.py's envelope) and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
import mgpu_trace
from fastlora_jax.kernels import nf4_dequant as dq
from fastlora_jax.kernels.int8_matmul import int8_matmul
from fastlora_jax.kernels.nf4_matmul import nf4_matmul, nf4_matmul_dx
from fastlora_jax.kernels.nf4_matmul_mgpu import MosaicMatmulTuning, nf4_matmul_mosaic
from fastlora_jax.kernels.quant_matmul_common import TritonMatmulTuning
from fastlora_jax.ops.linear import linear
from fastlora_jax.quant import QTensor, QuantKind, dequantize
from fastlora_jax.quant.qtensor import nbytes

T = TritonMatmulTuning
_PROJ = common.projection_shapes(common.LLAMA3_8B)
_H, _I, _KV = _PROJ["q_proj"][0], _PROJ["gate_proj"][1], _PROJ["k_proj"][1]
TRAIN = [(m, k, n) for m in (8192, 2048) for k, n in ((_H, _I), (_I, _H), (_H, _H), (_H, _KV))]
DECODE = [(m, _H, _I) for m in (1, 16, 64)]
SMOKE = [(16, 128, 64), (1, 128, 64), (64, 128, 64), (256, 256, 128)]
# Tunings tried around each default (the first of each list is the default).
TRITON_SWEEP = {
    "nf4": lambda m: [T.for_nf4(m), T(16, 128, 256, 4, 3), T(16, 64, 512, 8, 3),
                      T(16, 128, 128, 4, 3)],
    "nf4_dx": lambda m: [T.for_nf4_dx(), T(16, 64, 128, 4, 3)],
    "int8": lambda m: [T.for_int8(m), T(16, 32, 256, 4, 4)],
}
DEQUANT_SWEEP = [dq.DequantTuning.measured(), dq.DequantTuning(256, 4),
                 dq.DequantTuning(1024, 8), dq.DequantTuning(2048, 16)]
DECODE_GBS_TARGET = common.TARGETS["quantized matmul decode GB/s"]
TRAIN_TFLOPS_TARGET = common.TARGETS["quantized matmul TF/s"]


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


def time_per_layer(fn: Callable, x, ws, layers: int, reps: int) -> float:
    """Median seconds per layer of fn(x, ws) (compiled and warmed up first). Each rep dispatches
    enough calls back to back to span >= 2 ms before it waits, so that host dispatch overlaps the
    GPU's work."""
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


def device_us_per_layer(fn: Callable, x, ws, layers: int) -> tuple[float, dict[str, float]]:
    """GPU time per layer of one fn(x, ws) call from a profiler trace: the sum of the kernel
    durations on the device's stream lines (host dispatch excluded), and µs per kernel name."""
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


# The baselines as a user writes them: a bf16 product straight from the GEMM (float32
# accumulation on the GPU). A float32 product cast to bf16 would make the dx GEMM under jax.vjp
# take a float32 cotangent and run in float32, 1.6-1.9x slower at M = 8192.
def xla_fwd(x, w):
    return jnp.dot(x, dequantize(w, x.dtype).T)


def xla_bwd(dy, w):
    return jnp.dot(dy, dequantize(w, dy.dtype), preferred_element_type=jnp.float32).astype(dy.dtype)


def bf16_fwd(x, w):
    return jnp.dot(x, w.T)


def bf16_bwd(dy, w):
    return jnp.dot(dy, w, preferred_element_type=jnp.float32).astype(dy.dtype)


def with_dx(op: Callable) -> Callable:
    """(x, dy), w -> (op(x, w), dx): the forward and the input gradient, as a training step runs
    them (no gradient for the frozen weight)."""
    def fwd_dx(inp, w):
        x, dy = inp
        y, pull = jax.vjp(lambda a: op(a, w), x)
        return y, pull(dy)[0]
    return fwd_dx


class PrintingLog(list):
    """The run's log: each line is also printed when it is added (a run cut by a time limit still
    shows how far it got)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.sqrt(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2)))


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


class Timer:
    """Seconds per layer of (label, op, weights): GPU time on a GPU for decode shapes, else wall
    clock; failures are logged and leave the label out."""

    def __init__(self, inp, layers: int, gpu_clock: bool, reps: int, log: list[str]):
        self.inp, self.layers, self.gpu_clock, self.reps, self.log = (inp, layers, gpu_clock,
                                                                      reps, log)

    def __call__(self, timed: list[tuple[str, Callable, list]]) -> dict[str, float]:
        secs = {}
        for label, op, weights in timed:
            fn = scanned(op)
            try:
                if self.gpu_clock:
                    us, per = device_us_per_layer(fn, self.inp, weights, self.layers)
                    secs[label] = us / 1e6
                    detail = "; ".join(f"{name} {v:.1f}" for name, v in per.items())
                else:
                    secs[label] = time_per_layer(fn, self.inp, weights, self.layers, self.reps)
                    detail = "wall clock"
            except Exception as e:  # noqa: BLE001 -- a tuning that does not compile is reported
                self.log.append(f"  {label}: failed {type(e).__name__}: {str(e)[:300]}")
                continue
            self.log.append(f"  {label}: {secs[label] * 1e6:.1f} us/layer ({detail})")
        return secs


def decode_rows(case: str, us_of: dict[str, float], ours_label: str, triton_label: str | None,
                wbytes_q: int, tuning: str) -> list[dict]:
    """Rows of a decode case from times per label (µs per layer): ours against the bf16 GEMM,
    XLA's dequantize-then-dot and the Triton kernel (None: ours is the Triton kernel), and ours
    against the decode bandwidth target. No rows when ours was not timed; a baseline that was not
    timed is left out."""
    ours = us_of.get(ours_label)
    if ours is None:
        return []
    extra = {"tuning": tuning, "us_ours": ours}
    rows = [common.row(case, "us/layer (ratio = baseline / ours)", ours, name, us_of[label],
                       higher_is_better=False, target=target, **extra)
            for name, label, target in (
                ("bf16 GEMM (bf16 weights)", "bf16 GEMM", ">=1.0x"),
                ("XLA dequant+dot", "XLA dequant+dot", "~10x (an order of magnitude)"),
                ("Triton kernel (default tuning)", triton_label, "rule: >=1.0x to be default"))
            if label in us_of]
    gbs = wbytes_q / ours / 1e3
    rows.append(common.row(case, "weight GB/s", gbs, "decode target", DECODE_GBS_TARGET,
                           target=f">={DECODE_GBS_TARGET:.0f} GB/s (ratio = ours / target)",
                           **extra))
    return rows


def dispatch_rows(case: str, flops: float, secs: dict[str, float], wbytes_q: int | None,
                  extra: dict) -> list[dict]:
    """Rows of one `--dispatch` case from seconds per layer of "ours", "xla" and "bf16": ours
    against the faster baseline (the TF/s target too at M = 8192, extra["m"]) and against XLA's
    dequantize-then-dot; with wbytes_q (decode forward), ours' weight GB/s against the decode
    target."""
    ours, xla, bf = secs["ours"], secs["xla"], secs["bf16"]
    tf = lambda s: flops / s / 1e12  # noqa: E731
    extra = {**extra, "us_ours": ours * 1e6, "us_xla_dq": xla * 1e6, "us_bf16": bf * 1e6}
    rows = [common.row(case, "TF/s", tf(ours), "faster of bf16 GEMM and XLA dequant+dot",
                       tf(min(xla, bf)),
                       target=(f">=1.0x and >={TRAIN_TFLOPS_TARGET:.0f} TF/s"
                               if extra.get("m", 0) >= 8192 else ">=1.0x"), **extra),
            common.row(case, "TF/s", tf(ours), "XLA dequant+dot", tf(xla), target=">=1.0x",
                       **extra)]
    if wbytes_q is not None:
        gbs = wbytes_q / ours / 1e9
        rows.append(common.row(case, "weight GB/s", gbs, "decode target", DECODE_GBS_TARGET,
                               target=f">={DECODE_GBS_TARGET:.0f} GB/s (ratio = ours / target)",
                               **extra))
    return rows


def dispatch_case(kind: str, m: int, k: int, n: int, directions: tuple[str, ...], reps: int,
                  log: list[str]) -> list[dict]:
    """`ops.linear` as the model calls it, forward and forward + dx, against the bf16 GEMM on
    bf16 weights and XLA's dequantize-then-dot on the same quantized weights."""
    gpu_clock = m <= 64 and jax.default_backend() == "gpu"
    layers, ws, wb, x, dy = case_inputs(kind, m, k, n)
    name = f"{kind} M={m} K={k} N={n}"
    log.append(f"{name} (model default: ops.linear)")
    rows = []
    for direction in directions:
        if direction == "fwd":
            ops, inp, flops = {"ours": linear, "xla": xla_fwd, "bf16": bf16_fwd}, x, 2.0 * m * n * k
        else:
            ops = {"ours": with_dx(linear), "xla": with_dx(xla_fwd), "bf16": with_dx(bf16_fwd)}
            inp, flops, direction = (x, dy), 4.0 * m * n * k, "fwd+dx"
        secs = Timer(inp, layers, gpu_clock, reps, log)(
            [(label, op, wb if label == "bf16" else ws) for label, op in ops.items()])
        got, ref = scanned(ops["ours"])(inp, ws)[0], scanned(ops["xla"])(inp, ws)[0]
        errs = [rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                               jax.tree_util.tree_leaves(ref))]
        log.append(f"  {direction}: rel err vs xla-dq " + " / ".join(f"{e:.2e}" for e in errs))
        extra = {"m": m, "timing": "GPU time (profiler trace)" if gpu_clock else "wall clock",
                 "rel_err_vs_xla_dq": max(errs)}
        rows += dispatch_rows(f"{name} {direction}, model default", flops, secs,
                              nbytes(ws[0]) if m <= 16 and direction == "fwd" else None, extra)
    return rows


def decode_case(kind: str, m: int, k: int, n: int, directions: tuple[str, ...], mosaic: bool,
                quick: bool, reps: int, profile: pathlib.Path | None,
                log: list[str]) -> list[dict]:
    """Decode (M <= 64): the fused kernels' tunings against the baselines; rows for each
    direction's default (the Mosaic one when timed, else the Triton one)."""
    interpret = jax.default_backend() != "gpu"
    layers, ws, wb, x, dy = case_inputs(kind, m, k, n)
    wbytes_q = nbytes(ws[0])
    rows = []
    for direction in directions:
        sweep_key = kind if direction == "fwd" else f"{kind}_dx"
        if sweep_key not in TRITON_SWEEP:
            continue  # int8 has no dx kernel: XLA's runs
        inp = x if direction == "fwd" else dy
        timer = Timer(inp, layers, not interpret, reps, log)
        log.append(f"{kind} M={m} K={k} N={n} {direction}")
        timed = [("bf16 GEMM", bf16_fwd if direction == "fwd" else bf16_bwd, wb),
                 ("XLA dequant+dot", xla_fwd if direction == "fwd" else xla_bwd, ws)]
        triton = TRITON_SWEEP[sweep_key](m)[:1 if quick else None]
        op = {"nf4": nf4_matmul, "nf4_dx": nf4_matmul_dx, "int8": int8_matmul}[sweep_key]
        timed += [(f"triton {t}", lambda a, w, t=t: op(a, w, tuning=t, interpret=interpret), ws)
                  for t in triton]
        mgpu = []
        if mosaic and kind == "nf4" and direction == "fwd":
            default = MosaicMatmulTuning.for_m(m, k)
            mgpu = [default]
            if not quick:
                mgpu += [dataclasses.replace(default, blocks_per_step=b)
                         for b in (2, 1) if b < default.blocks_per_step]
                mgpu.append(dataclasses.replace(default, splits=4))
            timed += [(f"mosaic {t}", lambda a, w, t=t: nf4_matmul_mosaic(
                a, w, tuning=t, interpret=interpret), ws) for t in mgpu]
            if profile is not None:
                log.append(mosaic_profile(kind, m, k, n, x, ws[0], default, profile))
        secs = timer(timed)
        us_of = {label: s * 1e6 for label, s in secs.items()}
        ours = f"mosaic {mgpu[0]}" if mgpu else f"triton {triton[0]}"
        rows += decode_rows(f"{kind} M={m} K={k} N={n} {direction}", us_of, ours,
                            f"triton {triton[0]}" if mgpu else None, wbytes_q,
                            ours.split(" ", 1)[1])
    return rows


def mosaic_profile(kind: str, m: int, k: int, n: int, x, w, tuning: MosaicMatmulTuning,
                   directory: pathlib.Path) -> str:
    """One Mosaic decode launch with the in-kernel profiler; the summary of its trace."""
    out = directory / f"{kind}_M{m}_K{k}_N{n}"
    out.mkdir(parents=True, exist_ok=True)
    t = dataclasses.replace(tuning, profile_dir=str(out))
    try:
        jax.block_until_ready(jax.jit(lambda a: nf4_matmul_mosaic(a, w, tuning=t))(x))
        jax.effects_barrier()  # the profiler writes its trace from a host callback
        return f"  in-kernel profile of {t}:\n{mgpu_trace.format_summary(out)}"
    except Exception as e:  # noqa: BLE001 -- reported, the benchmark goes on
        return f"  in-kernel profile failed: {type(e).__name__}: {str(e)[:300]}"


def dequant_dot_case(m: int, k: int, n: int, directions: tuple[str, ...], reps: int,
                     log: list[str]) -> list[dict]:
    """NF4 at M > 64: our dequantization kernel + XLA's GEMM against XLA's dequantize-then-dot
    and the bf16 GEMM, forward and dx."""
    layers, ws, wb, x, dy = case_inputs("nf4", m, k, n)
    flops = 2.0 * m * n * k
    tf = lambda s: flops / s / 1e12  # noqa: E731
    rows = []
    for direction in directions:
        inp = x if direction == "fwd" else dy
        ours = dq.dequant_then_dot if direction == "fwd" else dq.dequant_dx
        xla_op = xla_fwd if direction == "fwd" else xla_bwd
        log.append(f"nf4 M={m} K={k} N={n} {direction}")
        secs = Timer(inp, layers, False, reps, log)(
            [("ours", ours, ws), ("xla", xla_op, ws),
             ("bf16", bf16_fwd if direction == "fwd" else bf16_bwd, wb)])
        if len(secs) < 3:
            continue
        err = rel_err(scanned(ours)(inp, ws)[0], scanned(xla_op)(inp, ws)[0])
        case = f"nf4 M={m} K={k} N={n} {direction} ours_dequant+dot"
        extra = {"rel_err_vs_xla_dq": err, "us_ours": secs["ours"] * 1e6}
        rows += [common.row(case, "TF/s", tf(secs["ours"]), "XLA dequant+dot", tf(secs["xla"]),
                            target="rule: >=1.0x to be default", **extra),
                 common.row(case, "TF/s", tf(secs["ours"]), "bf16 GEMM (bf16 weights)",
                            tf(secs["bf16"]), target="ceiling: ~1.0x", **extra)]
    return rows


def dequant_alone(k: int, n: int, quick: bool, reps: int, log: list[str]) -> list[dict]:
    """nf4_dequantize alone (a tuning sweep) vs XLA's dequantize on 4 distinct [n, k] weights;
    GB/s = (codes + absmax + nested read + bf16 written) / time."""
    layers = 4
    ws = unstack(random_nf4(jax.random.PRNGKey(k + n), layers, n, k), layers)
    moved = nbytes(ws[0]) + 2 * n * k
    log.append(f"nf4 dequant K={k} N={n}")
    xla = lambda _, w: dequantize(w, jnp.bfloat16)  # noqa: E731
    sweep = DEQUANT_SWEEP[:1] if quick else DEQUANT_SWEEP
    secs = Timer(None, layers, False, reps, log)(
        [("xla", xla, ws)] + [(f"{t}", lambda _, w, t=t: dq.nf4_dequantize(w, jnp.bfloat16,
                                                                            tuning=t), ws)
                              for t in sweep])
    ref = scanned(xla)(None, ws)[0]
    rows = []
    for t in sweep:
        if str(t) not in secs or "xla" not in secs:
            continue
        got = scanned(lambda _, w, t=t: dq.nf4_dequantize(w, jnp.bfloat16, tuning=t))(None, ws)[0]
        differing = float(jnp.mean(jax.lax.bitcast_convert_type(got, jnp.uint16)
                                   != jax.lax.bitcast_convert_type(ref, jnp.uint16)))
        gbs = lambda s: moved / s / 1e9  # noqa: E731
        rows.append(common.row(f"nf4 dequant K={k} N={n} {t.block_rows}/{t.num_warps}", "GB/s",
                               gbs(secs[str(t)]), "XLA dequantize (bf16)", gbs(secs["xla"]),
                               target="bandwidth-bound (H200 ~4.8 TB/s peak)", tuning=str(t),
                               frac_differing_vs_xla=differing, bytes_moved=moved))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=common.RESULTS)
    ap.add_argument("--commit", default="")
    ap.add_argument("--tag", default="", help="suffix of the JSON name: nf4_matmul-<date>-<tag>")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted, on the CPU")
    ap.add_argument("--kinds", default="nf4,int8")
    ap.add_argument("--shapes", default=None, help="MxKxN,... (default: Llama-3-8B's)")
    ap.add_argument("--directions", default="fwd,bwd")
    ap.add_argument("--dispatch", action="store_true",
                    help="time ops.linear's default (what the model runs) instead of sweeps")
    ap.add_argument("--mosaic", action="store_true",
                    help="also sweep the Hopper Mosaic GPU forward (NF4 decode)")
    ap.add_argument("--quick", action="store_true", help="default tunings only")
    ap.add_argument("--dequant-shapes", default=f"{_H}x{_I}",
                    help="KxN,... for the dequantization kernel alone ('' to skip)")
    ap.add_argument("--profile", type=pathlib.Path, default=None,
                    help="with --mosaic: also profile one Mosaic decode launch in-kernel, traces "
                         "under this folder (benchmarks/mgpu_trace.py summarises them)")
    args = ap.parse_args(argv)
    directions = tuple(args.directions.split(","))
    reps = 2 if args.smoke else 5
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif args.smoke:
        shapes = SMOKE
    else:
        shapes = TRAIN + DECODE
    dequant_shapes = ([(128, 64)] if args.smoke else
                      [tuple(int(v) for v in s.split("x")) for s in args.dequant_shapes.split(",")
                       if s])
    log: list[str] = PrintingLog()
    doc = common.jax_envelope("nf4_matmul", commit=args.commit, log=log)
    path = common.write(doc, args.out, args.tag)
    kinds = args.kinds.split(",")
    if "nf4" in kinds and not args.dispatch:
        for k, n in dequant_shapes:
            doc["rows"] += dequant_alone(k, n, args.quick or args.smoke, reps, log)
            path = common.write(doc, args.out, args.tag)
    for kind in kinds:
        for m, k, n in shapes:
            if kind == "int8" and not args.shapes and m == 2048:
                continue  # int8: the M = 8192 and decode shapes
            try:
                if args.dispatch:
                    doc["rows"] += dispatch_case(kind, m, k, n, directions, reps, log)
                elif m <= 64:
                    doc["rows"] += decode_case(kind, m, k, n, directions, args.mosaic,
                                               args.quick or args.smoke, reps, args.profile,
                                               log)
                elif kind == "nf4":
                    doc["rows"] += dequant_dot_case(m, k, n, directions, reps, log)
            except Exception as e:  # noqa: BLE001 -- reported, the other shapes still run
                log.append(f"{kind} {(m, k, n)} failed: {type(e).__name__}: {str(e)[:500]}")
            path = common.write(doc, args.out, args.tag)
    print(common.markdown_table(doc["rows"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
