"""Peak host memory of `from_pretrained(load_in_4bit=True)` on a synthetic Llama-3-8B checkpoint.

Writes a random bf16 checkpoint with Llama-3-8B's shapes (sharded safetensors, ~16 GB for 32
layers; --layers to shrink it), then loads it with NF4 quantization in a fresh process and reports
that process's peak RSS next to: the bf16 checkpoint size, one decoder layer in bf16, and the
quantized model's size. The loader streams tensor by tensor, so the peak should stay near the
quantized model plus about one layer in bf16 (plus the Python/JAX baseline, also measured).
Usage: .venv/bin/python benchmarks/quantize_memory.py --dir /tmp/llama8b-synthetic [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

import common  # a sibling: benchmarks/ is on the path when a benchmark runs

REPO = common.REPO
CONFIG = dict(common.LLAMA3_8B, torch_dtype="bfloat16")

CHILD = """
import json, sys, time
import jax
from fastlora_jax import FastLanguageModel
from fastlora_jax.quant.qtensor import nbytes
def current_rss():
    # ru_maxrss survives exec (it would report the parent's peak), so read VmRSS/VmHWM instead
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
base = current_rss()["VmRSS"]
t = time.perf_counter()
model, _ = FastLanguageModel.from_pretrained(sys.argv[1], dtype="bfloat16", load_in_4bit=True)
elapsed = time.perf_counter() - t
params = model.params()
size = 0
for leaf in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "codes")):
    size += nbytes(leaf) if hasattr(leaf, "codes") else leaf.nbytes
print(json.dumps({"peak_rss": current_rss()["VmHWM"], "baseline_rss": base,
                  "model_bytes": size, "seconds": elapsed, "jax_version": jax.__version__}))
"""


def layer_tensors(rng: np.random.Generator, i: int) -> dict[str, np.ndarray]:
    H = CONFIG["hidden_size"]
    shapes = {f"{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}."
              f"{name}.weight": (n, k)
              for name, (k, n) in common.projection_shapes(CONFIG).items()}
    shapes.update({"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)})
    return {f"model.layers.{i}.{k}": (rng.standard_normal(s, np.float32) * 0.02)
            .astype(ml_dtypes.bfloat16) for k, s in shapes.items()}


def write_checkpoint(folder: pathlib.Path, layers: int) -> int:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, num_hidden_layers=layers)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    V, H = CONFIG["vocab_size"], CONFIG["hidden_size"]

    def matrix(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def shard(n: int) -> dict[str, np.ndarray]:  # built one at a time: this process stays small
        if n == 0:
            return {"model.embed_tokens.weight": matrix((V, H))}
        if n <= layers:
            return layer_tensors(rng, n - 1)
        return {"model.norm.weight": np.ones(H, ml_dtypes.bfloat16),
                "lm_head.weight": matrix((V, H))}

    count = layers + 2
    weight_map, total = {}, 0
    for n in range(count):
        tensors = shard(n)
        name = f"model-{n + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=pathlib.Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reuse", action="store_true", help="the checkpoint in --dir exists")
    args = parser.parse_args()
    t = time.perf_counter()
    if args.reuse:
        ckpt_bytes = json.loads((args.dir / "model.safetensors.index.json").read_text())[
            "metadata"]["total_size"]
    else:
        ckpt_bytes = write_checkpoint(args.dir, args.layers)
    print(f"wrote {ckpt_bytes / 2**30:.2f} GiB in {time.perf_counter() - t:.0f}s", flush=True)
    layer_bytes = sum(t.nbytes for t in layer_tensors(np.random.default_rng(1), 0).values())
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.dir)], capture_output=True,
                         text=True, cwd=REPO, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    bound = child["model_bytes"] + layer_bytes + child["baseline_rss"]
    result = common.envelope(
        "quantize_memory", device="CPU (2 cores, 24 GiB)",
        versions={"jax": child["jax_version"]},
        details={"quantized_model_gib": child["model_bytes"] / gib,
                 "one_layer_bf16_gib": layer_bytes / gib,
                 "baseline_rss_gib": child["baseline_rss"] / gib, "bound_gib": bound / gib,
                 "load_seconds": child["seconds"], "within_bound": child["peak_rss"] <= bound})
    result["rows"] = [common.row(
        f"Llama-3-8B shapes, {args.layers} layers, bf16 -> NF4", "peak RSS (GiB)",
        child["peak_rss"] / gib, "bf16 checkpoint size", ckpt_bytes / gib,
        higher_is_better=False, target="peak <= quantized model + one bf16 layer + baseline RSS")]
    path = common.write(result)
    print(json.dumps(result["details"], indent=2))
    print(f"peak RSS {child['peak_rss'] / gib:.2f} GiB vs bf16 checkpoint {ckpt_bytes / gib:.2f} "
          f"GiB; bound {bound / gib:.2f} GiB; wrote {path}")


if __name__ == "__main__":
    main()
