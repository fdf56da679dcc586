"""Sharding plan by compilation: what the QLoRA train step of Llama-3-8B / 70B needs per device.

Compiles (never runs) `train_step` on 1, 2, 4 and 8 fake CPU devices with abstract arrays
(`jax.ShapeDtypeStruct` with shardings: no weight is ever allocated), NF4 frozen projections in
their sharded layout, bf16 embeddings / norms / lm_head, LoRA r=16 on all seven projections
(float32, replicated), AdamW. Per device it reports, from the compiled executable:
  frozen   the frozen weights' share (the arguments' shard shapes)
  state    LoRA params + optimizer state + the batch (arguments too)
  temp     XLA's temp allocation (`memory_analysis().temp_size_in_bytes`): activations saved for
           the backward, the gathered layer, workspace
  peak     arguments + outputs not aliased to arguments + temp
  comm     bytes moved by collectives per step: each all-gather / all-reduce / reduce-scatter /
           all-to-all / collective-permute output, times the trip count of the loops around it
The CPU compiler's temp is an estimate of the GPU's: CPU attention (XLA's) materialises the
[B, heads, T, T] float32 scores of one layer at a time, which flash attention on the GPU does
not; the `scores` column gives that amount so it can be taken off.

Usage: .venv/bin/python benchmarks/sharding_plan.py [--models llama3-8b,llama3-70b]
       [--devices 1,2,4,8] [--seq 2048] [--batch 1] [--out benchmarks/results]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from fastlora_jax import ModelConfig  # noqa: E402
from fastlora_jax.lora import LoraConfig, init_lora, resolve  # noqa: E402
from fastlora_jax.lora.spec import PROJECTIONS  # noqa: E402
from fastlora_jax.models.decoder import param_specs, set_path  # noqa: E402
from fastlora_jax.ops import Impl  # noqa: E402
from fastlora_jax.quant import QTensor, QuantKind  # noqa: E402
from fastlora_jax.sharding import (MeshConfig, adapter_shardings, param_shardings,  # noqa: E402
                                   quantized_placement)
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step  # noqa: E402

GIB = 1024 ** 3
H200_GIB = 139.0  # usable HBM per H200 as the device reports it
MODELS = {
    "llama3-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                             intermediate_size=14336, num_layers=32, num_heads=32,
                             num_kv_heads=8, head_dim=128),
    "llama3-70b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=8192,
                              intermediate_size=28672, num_layers=80, num_heads=64,
                              num_kv_heads=8, head_dim=128),
}
# Per device count, the meshes planned: plain FSDP, and at 8 devices FSDP x tensor too.
MESHES = {1: [MeshConfig(1, 1, 1)], 2: [MeshConfig(1, 2, 1)], 4: [MeshConfig(1, 4, 1)],
          8: [MeshConfig(1, 8, 1), MeshConfig(1, 4, 2)]}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def abstract_nf4(shape: tuple[int, int], layers: int) -> QTensor:
    n, k = shape
    nb = n * k // 64
    sds = jax.ShapeDtypeStruct
    return QTensor(codes=sds((layers, n * k // 2), jnp.uint8), absmax=sds((layers, nb), jnp.uint8),
                   nested_absmax=sds((layers, -(-nb // 256)), jnp.float32),
                   nested_offset=sds((layers,), jnp.float32), shape=(n, k), dtype="bfloat16",
                   kind=QuantKind.NF4)


def abstract_frozen(cfg: ModelConfig, mesh: Any) -> dict[str, Any]:
    """The frozen tree as ShapeDtypeStructs carrying their shardings (NF4 projections)."""
    dense = param_shardings(cfg, mesh)
    quantized = {name for _, name in PROJECTIONS}
    tree: dict[str, Any] = {}
    for spec in param_specs(cfg):
        if spec.path[-1] == "weight" and spec.path[-2] in quantized:
            view, specs, _ = quantized_placement(
                abstract_nf4(spec.layer_shape, cfg.num_layers), spec.axes, mesh.shape)
            value = QTensor(**{f: jax.ShapeDtypeStruct(getattr(view, f).shape,
                                                       getattr(view, f).dtype,
                                                       sharding=NamedSharding(mesh, specs[f]))
                               for f in specs}, shape=view.shape, dtype=view.dtype,
                            kind=view.kind, tiled=view.tiled)
        else:
            sharding = dense
            for key in spec.path:
                sharding = sharding[key]
            value = jax.ShapeDtypeStruct(spec.shape, jnp.bfloat16, sharding=sharding)
        set_path(tree, spec.path, value)
    return tree


def per_device_bytes(tree: Any) -> int:
    total = 0
    for a in jax.tree.leaves(tree):
        shard = a.sharding.shard_shape(a.shape)
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return total


def collective_bytes(hlo: str) -> tuple[int, dict[str, int]]:
    """Bytes out of every collective per step, loops counted by their known trip counts."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None:
            comps[name].append(line)

    def shape_bytes(text: str) -> int:
        total = 0
        for dtype, dims in re.findall(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]", text):
            bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
            total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
        return total

    def group_size(line: str) -> int:
        named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
        if named:  # replica_groups=mesh['data'=1,'fsdp'=2,'tensor'=1] {'fsdp'}
            sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
            return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
        iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
        if iota:
            return int(iota.group(2))
        groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
        if groups:
            return len(groups.group(1).split(","))
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)  # collective-permute
        return 2 if pairs and re.search(r"\{(\d+),(?!\1\})", line) else 1

    memo: dict[str, dict[str, int]] = {}

    def visit(comp: str) -> dict[str, int]:
        if comp in memo:
            return memo[comp]
        out = dict.fromkeys(COLLECTIVES, 0)
        for line in comps.get(comp, []):
            m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(", line)
            if not m:
                continue
            shape, op = m.group(1), m.group(2)
            base = op.removesuffix("-start")
            if base in COLLECTIVES and group_size(line) > 1:
                out[base] += shape_bytes(shape)
            trips = 1
            tc = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if op == "while" and tc:
                trips = int(tc.group(1))
            for callee in re.findall(r"(?:body|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                                     line):
                if op == "fusion":
                    continue
                for k, v in visit(callee).items():
                    out[k] += trips * v
        memo[comp] = out
        return out

    per_kind = visit(entry)
    return sum(per_kind.values()), per_kind


def plan(name: str, cfg: ModelConfig, mesh_cfg: MeshConfig, seq: int, batch: int) -> dict:
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    mesh = mesh_cfg.make_mesh(jax.devices()[:n])
    frozen = abstract_frozen(cfg, mesh)
    spec = resolve(LoraConfig.create(r=16, lora_alpha=16), cfg, tuple(n for _, n in PROJECTIONS))
    lora = jax.eval_shape(lambda: init_lora(spec, cfg, frozen))
    opt = make_optimizer(learning_rate=2e-4, warmup_steps=0, total_steps=100)
    opt_state = jax.eval_shape(opt.init, lora)
    rep = NamedSharding(mesh, PartitionSpec())
    add = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                       sharding=sh), t, s)
    lora = add(lora, adapter_shardings(lora, mesh, shard=False))
    opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                             opt_state)
    rows = batch * mesh_cfg.data * mesh_cfg.fsdp
    bsh = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    data = {k: jax.ShapeDtypeStruct((1, rows, seq), jnp.int32, sharding=bsh)
            for k in ("input_ids", "targets", "positions", "segment_ids")}
    step_cfg = StepConfig(model=cfg, lora=spec, remat=True, attention_impl=Impl.XLA)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = train_step.lower(lora, opt_state, frozen, data, cfg=step_cfg,
                                    optimizer=opt).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if os.environ.get("PLAN_DUMP"):
        pathlib.Path(os.environ["PLAN_DUMP"]).write_text(hlo)
    comm, per_kind = collective_bytes(hlo)
    frozen_b, state_b = per_device_bytes(frozen), per_device_bytes((lora, opt_state, data))
    heads = cfg.num_heads // mesh_cfg.tensor
    scores = batch * heads * seq * seq * 4
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes \
        + mem.temp_size_in_bytes
    return {"model": name, "mesh": f"{mesh_cfg.data}x{mesh_cfg.fsdp}x{mesh_cfg.tensor}",
            "devices": n, "frozen": frozen_b, "state": state_b,
            "arguments": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes,
            "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes,
            "peak": peak, "scores": scores, "comm": comm, "comm_by_kind": per_kind,
            "tokens_per_step": rows * seq, "compile_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="rows per data-parallel group")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # the code this run imported
    results = []
    for name in args.models.split(","):
        for n in (int(d) for d in args.devices.split(",")):
            for mesh_cfg in MESHES[n]:
                r = plan(name, MODELS[name], mesh_cfg, args.seq, args.batch)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "comm_by_kind"}), flush=True)
    rows = []
    for r in results:
        one = next(x for x in results if x["model"] == r["model"] and x["devices"] == 1)
        case = f"{r['model']} {r['mesh']} seq {args.seq} batch {args.batch}/group"
        rows.append({"case": case, "metric": "per-device frozen GiB", "ours": r["frozen"] / GIB,
                     "baseline_name": "1 device", "baseline": one["frozen"] / GIB,
                     "ratio": one["frozen"] / r["frozen"], "target": r["devices"]
                     / (1 if r["mesh"].endswith("x1") else 1)})
        rows.append({"case": case, "metric": "per-device peak GiB (XLA plan, CPU)",
                     "ours": r["peak"] / GIB, "baseline_name": "H200 usable HBM",
                     "baseline": H200_GIB, "ratio": H200_GIB / (r["peak"] / GIB),
                     "target": 1.0})
    date = datetime.date.today().isoformat()
    doc = {"benchmark": "sharding_plan", "date": date, "device": "8 fake CPU devices (compile only)",
           "jax_version": jax.__version__, "commit": commit, "rows": rows, "raw": results}
    out = pathlib.Path(args.out) / f"sharding_plan-{date}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nper device, GiB (seq {args.seq}, {args.batch} row per data-parallel group, "
          f"remat per layer); fits = peak - scores <= {H200_GIB} GiB (one H200)")
    print(f"{'model':<11} {'mesh':<6} {'frozen':>7} {'state':>7} {'temp':>7} {'scores':>7} "
          f"{'peak':>7} {'comm/step':>9} {'fits':>5}")
    for r in results:
        fits = (r["peak"] - r["scores"]) / GIB <= H200_GIB
        print(f"{r['model']:<11} {r['mesh']:<6} {r['frozen'] / GIB:7.2f} {r['state'] / GIB:7.2f} "
              f"{r['temp'] / GIB:7.2f} {r['scores'] / GIB:7.2f} {r['peak'] / GIB:7.2f} "
              f"{r['comm'] / GIB:9.2f} {'yes' if fits else 'no':>5}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
