"""GGUF export speed: ours (`save_pretrained_gguf`, model already loaded) against llama.cpp's
quantizer (`llama_model_quantize` on our f16 file, all CPU threads), measured in the same run.

Cases:
- `smollm2` (CPU): SmolLM2-135M-Instruct from .cache/models, methods q8_0, q4_k_m, q6_k.
- `llama3-8b` (GPU when there is one): Llama-3-8B shapes with random bf16 weights created on the
  device (`--layers` to shrink), method q4_k_m; its tokenizer stands in with SmolLM2's (the
  vocabulary is padded to 128256 rows). The baseline needs llama-cpp-python; where it is missing
  (the GPU image) the row records ours only.
- `llama3-small` (CPU): the same architecture at hidden 512 / MLP 1536 / 49152 tokens, 4 layers:
  every matrix fills 256-blocks, so q4_k_m runs our K-quants on all of them (SmolLM2's 576-wide
  rows send most tensors to the legacy fallbacks).

Ours is timed per method cold (first call in the process: JAX compiles the quantizers), then warm
`--repeats` times; llama.cpp runs `--repeats` times too, and the ratio compares each side's fastest
warm run (on a shared machine other work slows single runs at random, either side). llama.cpp runs in the reference environment (.refenv) in a subprocess
and times its own call. Rows follow benchmarks/common.py: ratio = baseline seconds / our
seconds (> 1: we are faster); target 1.0 (at most its time).
Usage: .venv/bin/python benchmarks/gguf_export.py [--cases smollm2,llama3-small] [--out DIR]
       python3 benchmarks/gguf_export.py --cases llama3-8b --layers 32 --tokenizer DIR   (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from common import LLAMA3_8B, REPO, RESULTS, jax_envelope, markdown_table, row, write

SMOLLM2 = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
SMALL = {"vocab_size": 49152, "hidden_size": 512, "intermediate_size": 1536,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}
TARGET = 1.0  # at most llama.cpp's time
QUANTIZE = """
import ctypes, json, os, sys, time
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = os.cpu_count()
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),
                                    ctypes.byref(params))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "threads": os.cpu_count()}))
"""


def llama_cpp_quantize(src: pathlib.Path, dst: pathlib.Path, ftype: int) -> dict | None:
    """llama.cpp's quantizer timed in the reference environment, or None without it."""
    for python in (REPO / ".refenv" / "bin" / "python", pathlib.Path(sys.executable)):
        if not python.exists():
            continue
        probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
        if probe.returncode == 0:
            out = subprocess.run([str(python), "-c", QUANTIZE, str(src), str(dst), str(ftype)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result["rc"] != 0:
                raise RuntimeError(f"llama_model_quantize returned {result['rc']}")
            return result
    return None


def timed_export(model, tokenizer, folder: pathlib.Path, method: str) -> tuple[float, pathlib.Path]:
    t = time.perf_counter()
    path = model.save_pretrained_gguf(folder, tokenizer, quantization_method=method,
                                      overwrite=True, show_progress=False)
    return time.perf_counter() - t, path


def llama3_model(layers: int, overrides: dict | None = None):
    """Llama-3-8B shapes (or `overrides`), random bf16 weights made on the default device."""
    from fastlora_jax.models.causal_lm import CausalLM
    from fastlora_jax.models.decoder import param_specs, set_path
    from fastlora_jax.models.registry import config_from_hf

    config = config_from_hf(dict(LLAMA3_8B, num_hidden_layers=layers, **(overrides or {})))
    params: dict = {}
    key = jax.random.PRNGKey(0)
    for i, spec in enumerate(param_specs(config)):
        value = 0.02 * jax.random.normal(jax.random.fold_in(key, i), spec.shape, jnp.bfloat16)
        if spec.path[-2].endswith("norm"):
            value = value + 1
        set_path(params, spec.path, value)
    return CausalLM(config, params)


def run_case(case: str, methods: list[str], work: pathlib.Path, layers: int,
             tokenizer_dir: pathlib.Path, repeats: int) -> list[dict]:
    from transformers import AutoTokenizer

    from fastlora_jax import FastLanguageModel
    from fastlora_jax.converters.gguf_quants import method as gguf_method

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if case == "smollm2":
        model, tokenizer = FastLanguageModel.from_pretrained(SMOLLM2, dtype="float32")
    elif case == "llama3-small":
        model = llama3_model(4, SMALL)
    else:
        model = llama3_model(layers)
    _, f16 = timed_export(model, tokenizer, work / "f16", "f16")
    rows = []
    for method in methods:
        cold, _ = timed_export(model, tokenizer, work / f"{method}-cold", method)
        warm = min(timed_export(model, tokenizer, work / method, method)[0]
                   for _ in range(repeats))
        runs = [llama_cpp_quantize(f16, work / f"llama_cpp_{method}.gguf",
                                   int(gguf_method(method).file_type)) for _ in range(repeats)]
        base = min(runs, key=lambda r: r["seconds"]) if runs[0] else None
        name = (f"llama.cpp llama_model_quantize on our f16 ({base['threads']} threads)"
                if base else "llama.cpp (not installed here)")
        baseline = base["seconds"] if base else None
        for metric, ours in ((f"seconds (warm, best of {repeats})", warm),
                             ("seconds (cold: includes JAX compile)", cold)):
            rows.append(row(f"{case} {method}", metric, round(ours, 3), name,
                            None if baseline is None else round(baseline, 3),
                            higher_is_better=False, target=TARGET))
        print(f"{case} {method}: ours {warm:.2f} s warm, {cold:.2f} s cold; "
              f"llama.cpp {baseline if baseline is None else round(baseline, 2)} s", flush=True)
        for leftover in (work / f"{method}-cold", work / method):
            for f in leftover.glob("*"):
                f.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="smollm2,llama3-small",
                        help="smollm2,llama3-small,llama3-8b")
    parser.add_argument("--methods", default=None, help="default: smollm2 q8_0,q4_k_m,q6_k; "
                                                        "llama3-8b q4_k_m")
    parser.add_argument("--layers", type=int, default=32, help="llama3-8b decoder layers")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("--repeats", type=int, default=3,
                        help="warm exports and llama.cpp runs per method; each side's fastest "
                             "counts (a shared, loaded machine slows runs at random)")
    parser.add_argument("--tokenizer", type=pathlib.Path, default=SMOLLM2,
                        help="tokenizer folder (SmolLM2's tokenizer files are enough for llama3-8b)")
    args = parser.parse_args()
    doc = jax_envelope("gguf_export", backend=jax.default_backend(), cpu_threads=os.cpu_count(),
                       load_average=os.getloadavg(), repeats=args.repeats)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for case in args.cases.split(","):
            methods = (args.methods.split(",") if args.methods else
                       ["q8_0", "q4_k_m", "q6_k"] if case == "smollm2" else
                       ["q4_k_m", "q6_k"] if case == "llama3-small" else ["q4_k_m"])
            doc["rows"] += run_case(case, methods, pathlib.Path(tmp) / case, args.layers,
                                    args.tokenizer, args.repeats)
            out = write(doc, args.out, args.tag)
    print(markdown_table(doc["rows"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
