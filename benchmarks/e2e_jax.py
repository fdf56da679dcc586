"""One JAX side of the end-to-end benchmark, in its own process (clean peak-memory count).

Run by `benchmarks/train_e2e.py`; prints one JSON object as its last line.
  --run ours        fastlora_jax's train_step (NF4 or bf16 frozen weights, a remat mode)
  --run plain_xla   the hand-written baseline in e2e_plain_xla.py (bf16, cuDNN, scan)
  --run context     compile-only memory analysis of our lean step at batch 1 for each --lengths
                    value, then one real step at --verify-seq (peak measured vs predicted)
  --run profile     per-part timings of one layer (fwd+bwd) at the micro-batch shape
  --run trace       `ours` under jax.profiler.trace for --steps steady-state steps, summarised by
                    step_trace.py (time by category, top ops); trace and JSON under --out
--linear-impl reference: the frozen quantized matmuls differentiated by JAX's autodiff (each
layer's dense weight kept for the backward), the path before the codes-only backward.
Model: Llama-3-8B's config with random weights created on the device (`--tiny`: a small model,
for the CPU smoke test). NF4 weights come from `quantize_nf4_on_device`, one layer at a time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
import e2e_plain_xla as px
import step_trace
from fastlora_jax import ModelConfig, ops
from fastlora_jax.lora import LoraConfig, init_lora, resolve
from fastlora_jax.lora.layer import lora_project, with_constants
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import is_projection
from fastlora_jax.models.registry import config_from_hf, family_for
from fastlora_jax.models.rope import apply_rope, cos_sin
from fastlora_jax.quant import stack
from fastlora_jax.quant.nf4_device import quantize_nf4_on_device
from fastlora_jax.train.loss import IGNORE, cross_entropy_sum
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step

RANK, ALPHA, LR = 16, 16.0, 2e-4


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)


_normal = jax.jit(_normal, static_argnums=1)


def make_frozen(config: ModelConfig, quant: str) -> dict:
    """Random bf16 parameters on the default device; NF4 projections quantized layer by layer."""
    key = jax.random.key(0)
    params: dict = {}
    for i, spec in enumerate(decoder.param_specs(config)):
        k = jax.random.fold_in(key, i)
        if "norm" in spec.path[-2]:
            value = jnp.ones(spec.shape, jnp.bfloat16)
        elif quant == "nf4" and is_projection(spec):
            value = stack([quantize_nf4_on_device(_normal(jax.random.fold_in(k, layer),
                                                          spec.layer_shape))
                           for layer in range(spec.shape[0])])
        else:
            value = _normal(k, spec.shape)
        decoder.set_path(params, spec.path, value)
    jax.block_until_ready(params)
    return params


def make_batch(config: ModelConfig, accumulation: int, micro_batch: int, seq: int) -> dict:
    """Random token rows [A, B, T], unpacked (no segment ids: nothing to mask)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (accumulation, micro_batch, seq), dtype=np.int32)
    targets = np.concatenate([ids[..., 1:], np.full(ids.shape[:-1] + (1,), IGNORE, np.int32)], -1)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape)
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
            "positions": jnp.asarray(pos)}


def memory(compiled: Any) -> dict:
    """XLA's buffer assignment of a compiled step (bytes) and the device's limit."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
        "alias_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
        "host_temp_size_in_bytes", "host_alias_size_in_bytes")}
    out["device_need_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    stats = jax.devices()[0].memory_stats() or {}
    out["bytes_limit"] = int(stats.get("bytes_limit", 0))
    return out


def peak_bytes() -> int:
    return int((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0))


def setup(config: ModelConfig, quant: str) -> tuple[dict, Any, dict, Any, Any]:
    """(frozen, LoRA spec, LoRA params, optimizer, optimizer state): r16 a16 on 7 projections."""
    frozen = make_frozen(config, quant)
    spec = resolve(LoraConfig.create(r=RANK, lora_alpha=ALPHA), config,
                   family_for(config.model_type).default_target_modules)
    lora = init_lora(spec, config, frozen)
    opt = make_optimizer(learning_rate=LR, warmup_steps=0, total_steps=100_000,
                         lr_scheduler_type="constant", max_grad_norm=1.0)
    return frozen, spec, lora, opt, opt.init(lora)


def compile_ours(config: ModelConfig, args: argparse.Namespace) -> tuple[Callable, Any, Any,
                                                                           Any, dict]:
    """(step(lora, state), compiled, lora, state, {setup_s, compile_s}) of our train_step."""
    t0 = time.perf_counter()
    frozen, spec, lora, opt, state = setup(config, args.quant)
    remat = {"none": False, "full": True, "offload": "offload", "dots": "dots"}[args.remat]
    cfg = StepConfig(model=config, lora=spec, remat=remat, loss_chunk=args.loss_chunk,
                     linear_impl=ops.Impl.REFERENCE if args.linear_impl == "reference" else None)
    batch = make_batch(config, args.accumulation, args.micro_batch, args.seq)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = train_step.lower(lora, state, frozen, batch, cfg=cfg, optimizer=opt).compile()
    compile_s = time.perf_counter() - t0
    step = lambda lo, st: compiled(lo, st, frozen, batch)  # noqa: E731
    return step, compiled, lora, state, {"setup_s": setup_s, "compile_s": compile_s}


def run_ours(config: ModelConfig, args: argparse.Namespace) -> dict:
    step, compiled, lora, state, times = compile_ours(config, args)
    setup_s, compile_s = times["setup_s"], times["compile_s"]
    result = timed_steps(step, lora, state, args.steps, args.warmup)
    tokens = args.accumulation * args.micro_batch * args.seq
    result.update(setup_s=setup_s, compile_s=compile_s, memory=memory(compiled),
                  tokens_per_s=tokens / result["step_s"], peak_bytes=peak_bytes(),
                  lora_params=int(sum(x.size for x in jax.tree.leaves(lora))))
    return result


def run_trace(config: ModelConfig, args: argparse.Namespace) -> dict:
    """`ours` for --warmup untraced then --steps traced steps; the trace's summary by category.
    The trace (TensorBoard / Perfetto readable) and step_trace-<date>.json go under --out."""
    step, compiled, lora, state, setup_times = compile_ours(config, args)
    lora, state, warm_times, warm_losses = run_steps(step, lora, state, args.warmup)
    tag = "" if args.linear_impl == "default" else f"linear-{args.linear_impl}"
    trace_dir = args.out / ("step_trace" + (f"-{tag}" if tag else ""))
    with jax.profiler.trace(str(trace_dir)):
        _, _, times, losses = run_steps(step, lora, state, args.steps)
    hlo = compiled.as_text()
    module = hlo.split(",", 1)[0].removeprefix("HloModule ").strip()
    summary = step_trace.summarize(trace_dir, hlo, args.steps, module=module)
    (trace_dir / "module.hlo.txt").write_text(hlo)
    print(step_trace.format_summary(summary))
    doc = common.jax_envelope("step_trace", commit=args.commit, setup=(
        f"our train_step, {args.quant}, remat {args.remat}, linear {args.linear_impl}, "
        f"micro-batch {args.micro_batch} x accumulation {args.accumulation} x seq {args.seq}, "
        f"{args.steps} traced steps after {args.warmup}"))
    doc.update(setup_times, summary=summary, step_s_traced=statistics.median(times),
               step_s_untraced=statistics.median(warm_times[1:]) if args.warmup > 1 else None,
               trace_dir=str(trace_dir))
    path = common.write(doc, args.out, tag)
    return {**setup_times, "categories": summary["categories"], "result_file": str(path),
            "step_s": statistics.median(times), "losses": warm_losses + losses}


def run_steps(step: Callable, lora: Any, state: Any, n: int) -> tuple[Any, Any, list, list]:
    """n steps one after the other: (lora, state, seconds per step, losses)."""
    times, losses = [], []
    for _ in range(n):
        start = time.perf_counter()
        lora, state, metrics = step(lora, state)
        loss = metrics["loss"] if isinstance(metrics, dict) else metrics
        losses.append(float(loss))  # blocks until the step is done
        times.append(time.perf_counter() - start)
    return lora, state, times, losses


def timed_steps(step: Callable, lora: Any, state: Any, steps: int, warmup: int) -> dict:
    _, _, times, losses = run_steps(step, lora, state, warmup + steps)
    return {"step_s": statistics.median(times[warmup:]), "first_step_s": times[0],
            "losses": losses}


def run_plain_xla(raw: dict, args: argparse.Namespace) -> dict:
    import optax

    t0 = time.perf_counter()
    frozen, lora = px.init(raw, jax.random.key(0), RANK)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.0))
    state = opt.init(lora)
    config = config_from_hf(raw)
    b = make_batch(config, args.accumulation, args.micro_batch, args.seq)
    jax.block_until_ready((frozen, lora))
    setup_s = time.perf_counter() - t0
    kw = dict(c=tuple(sorted(raw.items())), opt=opt, scale=ALPHA / RANK,
              chunk=min(args.loss_chunk, args.micro_batch * args.seq))
    t0 = time.perf_counter()
    compiled = px.train_step.lower(lora, state, frozen, b["input_ids"], b["targets"],
                                   **kw).compile()
    compile_s = time.perf_counter() - t0
    step = lambda lo, st: compiled(lo, st, frozen, b["input_ids"], b["targets"])  # noqa: E731
    result = timed_steps(step, lora, state, args.steps, args.warmup)
    tokens = args.accumulation * args.micro_batch * args.seq
    result.update(setup_s=setup_s, compile_s=compile_s, memory=memory(compiled),
                  tokens_per_s=tokens / result["step_s"], peak_bytes=peak_bytes())
    return result


def run_context(config: ModelConfig, args: argparse.Namespace) -> dict:
    """Compile-only: does the lean step (batch 1, offload remat, chunked loss) fit at a length?"""
    import psutil

    frozen, spec, lora, opt, state = setup(config, args.quant)
    cfg = StepConfig(model=config, lora=spec, remat="offload", loss_chunk=args.loss_chunk)
    host_free = psutil.virtual_memory().available
    probes: list[dict] = []

    def probe(seq: int) -> bool:
        batch = jax.eval_shape(lambda: make_batch(config, 1, 1, seq))
        t0 = time.perf_counter()
        try:
            compiled = train_step.lower(lora, state, frozen, batch, cfg=cfg,
                                        optimizer=opt).compile()
            mem = memory(compiled)
        except Exception as e:  # an XLA resource error at compile time means it does not fit
            probes.append({"seq": seq, "fits": False, "error": str(e)[:300],
                           "compile_s": time.perf_counter() - t0})
            return False
        offloaded = config.num_layers * seq * config.hidden_size * 2  # bf16 layer inputs
        fits_device = mem["device_need_bytes"] <= 0.97 * mem["bytes_limit"]
        fits_host = max(mem["host_temp_size_in_bytes"], offloaded) <= 0.9 * host_free
        probes.append({"seq": seq, "fits": fits_device and fits_host, "fits_device": fits_device,
                       "fits_host": fits_host, "offloaded_bytes": offloaded, "memory": mem,
                       "compile_s": time.perf_counter() - t0})
        return fits_device and fits_host

    lo, hi = 0, None
    for seq in [int(s) for s in args.lengths.split(",") if s]:
        if probe(seq):
            lo = max(lo, seq)
        else:
            hi = seq if hi is None else min(hi, seq)
            break
    for _ in range(args.bisect_steps):  # in multiples of 8192 tokens
        if hi is None or hi - lo <= 8192:
            break
        mid = (lo + hi) // 2 // 8192 * 8192
        if probe(mid):
            lo = mid
        else:
            hi = mid
    result: dict = {"probes": probes, "host_available_bytes": host_free, "max_fits": lo,
                    "first_fail": hi}
    if args.verify_seq:
        batch = make_batch(config, 1, 1, args.verify_seq)
        compiled = train_step.lower(lora, state, frozen, batch, cfg=cfg, optimizer=opt).compile()
        t0 = time.perf_counter()
        lora, state, metrics = compiled(lora, state, frozen, batch)
        loss = float(metrics["loss"])
        result["verify"] = {"seq": args.verify_seq, "step_s": time.perf_counter() - t0,
                            "loss": loss, "peak_bytes": peak_bytes(), "memory": memory(compiled)}
    return result


def _time(fn: Callable, *xs: Any, reps: int = 10) -> float:
    jax.block_until_ready(fn(*xs))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_profile(config: ModelConfig, args: argparse.Namespace) -> dict:
    """Seconds per optimizer step spent in each part, from one layer's parts timed alone.

    Each part is jit'd forward + backward (gradients w.r.t. its activations; LoRA also w.r.t. A
    and B) at the micro-batch shape and multiplied by layers x micro-batches; the loss part by
    micro-batches. What the parts do not cover (remat recompute, optimizer, scan and copies) is
    the step time minus their sum, reported by train_e2e.py.
    """
    c = config
    b, t, a = args.micro_batch, args.seq, args.accumulation
    frozen, spec, lora, _, _ = setup(c, args.quant)
    keys = jax.random.split(jax.random.key(1), 8)
    x = jax.random.normal(keys[0], (b, t, c.hidden_size), jnp.bfloat16)
    xi = jax.random.normal(keys[1], (b, t, c.intermediate_size), jnp.bfloat16)
    q = jax.random.normal(keys[2], (b, t, c.num_heads, c.head_dim), jnp.bfloat16)
    kv = jax.random.normal(keys[3], (b, t, c.num_kv_heads, c.head_dim), jnp.bfloat16)
    layer0 = jax.tree.map(lambda w: w[0], frozen["layers"])
    lora0 = jax.tree.map(lambda w: w[0], with_constants(lora, spec, None)["layers"])
    inputs = {"q_proj": x, "k_proj": x, "v_proj": x, "o_proj": x, "gate_proj": x, "up_proj": x,
              "down_proj": xi}
    groups = {name: group for group, name in spec.targets}
    project = lora_project(spec, train=False)
    parts: dict[str, float] = {}

    def frozen_part(x: jax.Array, w: Any) -> jax.Array:
        return jnp.sum(ops.linear(x, w).astype(jnp.float32))

    def adapted(x: jax.Array, lo: dict, w: Any) -> jax.Array:
        return jnp.sum(project(x, "", {"weight": w}, lo).astype(jnp.float32))

    fg = jax.jit(jax.grad(frozen_part))
    ag = jax.jit(jax.grad(adapted, argnums=(0, 1)))
    mm, lo_t = 0.0, 0.0
    for name, xin in inputs.items():
        w = layer0[groups[name]][name]["weight"]
        alone = _time(fg, xin, w)
        mm += alone
        # LoRA's share: the adapted projection (fwd + dx + dA + dB) minus the frozen one alone
        lo_t += _time(ag, xin, dict(lora0[groups[name]][name]), w) - alone
    parts["frozen matmuls (fwd + dx)"] = mm
    parts["LoRA A/B (fwd + bwd)"] = lo_t

    def attn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(ops.attention(q, k, v, causal=True).astype(jnp.float32))

    parts["attention (fwd + bwd)"] = _time(jax.jit(jax.grad(attn, argnums=(0, 1, 2))), q, kv, kv)

    cos, sin = cos_sin(c, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))

    def elementwise(x: jax.Array, xi: jax.Array, q: jax.Array, k: jax.Array) -> jax.Array:
        n1 = decoder.rms_norm(x, layer0["input_layernorm"]["weight"], eps=c.rms_norm_eps,
                              offset=c.norm_offset)
        n2 = decoder.rms_norm(x, layer0["post_attention_layernorm"]["weight"],
                              eps=c.rms_norm_eps, offset=c.norm_offset)
        act = jax.nn.silu(xi) * xi
        rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return sum(jnp.sum(v.astype(jnp.float32)) for v in (n1, n2, act, rq, rk, x + x))

    parts["norms, rope, SwiGLU, residuals (fwd + bwd)"] = _time(
        jax.jit(jax.grad(elementwise, argnums=(0, 1, 2, 3))), x, xi, q, kv)
    for k in list(parts):
        parts[k] *= c.num_layers * a
    head = decoder.lm_head_weight(c, frozen)
    targets = jax.random.randint(keys[4], (b, t), 0, c.vocab_size)
    loss = jax.jit(jax.grad(lambda h: cross_entropy_sum(h, head, targets,
                                                        chunk=args.loss_chunk)[0]))
    parts["loss: lm_head + cross-entropy (fwd + bwd)"] = _time(loss, x) * a
    return {"parts_s": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", choices=("ours", "plain_xla", "context", "profile", "trace"),
                        required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--quant", choices=("nf4", "bf16"), default="nf4")
    parser.add_argument("--remat", choices=("none", "full", "offload", "dots"), default="none")
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lengths", default="")
    parser.add_argument("--bisect-steps", type=int, default=3)
    parser.add_argument("--verify-seq", type=int, default=0)
    parser.add_argument("--linear-impl", choices=("default", "reference"), default="default")
    parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS,
                        help="--run trace: where the trace and its summary go")
    parser.add_argument("--commit", default="")
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU smoke test)")
    args = parser.parse_args()
    raw = common.TINY_LLAMA if args.tiny else common.LLAMA3_8B
    config = config_from_hf(raw)
    start = time.perf_counter()
    if args.run == "ours":
        result = run_ours(config, args)
    elif args.run == "plain_xla":
        result = run_plain_xla(raw, args)
    elif args.run == "context":
        result = run_context(config, args)
    elif args.run == "trace":
        result = run_trace(config, args)
    else:
        result = run_profile(config, args)
    result.update(name=args.name or args.run, wall_s=time.perf_counter() - start,
                  device=str(jax.devices()[0].device_kind), versions={"jax": jax.__version__},
                  settings={k: str(v) if isinstance(v, pathlib.Path) else v
                            for k, v in vars(args).items() if k not in ("run", "name")})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
