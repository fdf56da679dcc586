"""Drive llama.cpp (llama-cpp-python in the reference environment) on GGUF files we wrote.

`llama_cpp_jobs([...])` runs a list of jobs in one reference subprocess and returns one result
per job, through llama.cpp's C API (llama_cpp's bindings): every model loads with a float32 KV
cache and plain (not flash) attention, 2 threads, a context of n_ctx (default 512) tokens
decoded in one batch, and without the CPU's extra buffer types (see the script). Jobs (dicts):

- {"kind": "greedy", "path", "ids", "n", "lora"?}: the greedy continuation (argmax of the logits,
  n new tokens, no stop) -> int array [n]
- {"kind": "logits", "path", "ids"}: logits of every position -> float32 [len(ids), vocab]
- {"kind": "nll", "path", "ids", "n_ctx"}: negative log-likelihood of each next token, the text
  cut into windows of n_ctx tokens -> float64 [tokens scored]
- {"kind": "tokenize", "path", "texts"}: token ids of each text (no BOS, special tokens parsed)
  -> int array of the concatenation, the lengths in "<i>_len"
- {"kind": "quantize", "path", "out", "ftype"}: llama.cpp's own quantizer on our file
  (`llama_model_quantize`, ftype = gguf.LlamaFileType value) -> its return code
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastlora_jax.testing.refenv import run_reference

SCRIPT = """
import ctypes
import llama_cpp as lc

lc.llama_backend_init()


def open_model(job):
    params = lc.llama_model_default_params()
    # The CPU's extra buffer types (AMX / repacked weights) crash this build on quantized
    # weights; the plain CPU buffers compute the same model.
    params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(job["path"].encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {job['path']}")
    n_ctx = job.get("n_ctx", 512)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.type_k = cparams.type_v = 0  # float32 KV cache
    cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds K/V
    ctx = lc.llama_init_from_model(model, cparams)
    if job.get("lora"):
        adapter = lc.llama_adapter_lora_init(model, job["lora"].encode())
        if not adapter:
            raise RuntimeError(f"llama.cpp could not load the adapter {job['lora']}")
        if lc.llama_set_adapters_lora(ctx, (lc.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                      (ctypes.c_float * 1)(1.0)):
            raise RuntimeError("llama.cpp refused the adapter")
    return model, ctx


def decode(model, ctx, tokens, n_past):
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(len(tokens), 0, 1)
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, n_past + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, True
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy()
    lc.llama_batch_free(batch)
    return logits


for i, job in enumerate(ARGS["jobs"]):
    kind, key = job["kind"], str(i)
    if kind == "quantize":
        params = lc.llama_model_quantize_default_params()
        params.ftype = job["ftype"]
        params.nthread = 2
        OUTPUTS[key] = np.array(lc.llama_model_quantize(
            job["path"].encode(), job["out"].encode(), ctypes.byref(params)))
        continue
    model, ctx = open_model(job)
    if kind == "greedy":
        ids, out = list(job["ids"]), []
        logits = decode(model, ctx, ids, 0)[-1]
        for step in range(job["n"]):
            out.append(int(np.argmax(logits)))
            if step + 1 < job["n"]:
                logits = decode(model, ctx, [out[-1]], len(ids) + step)[-1]
        OUTPUTS[key] = np.array(out)
    elif kind == "logits":
        OUTPUTS[key] = decode(model, ctx, job["ids"], 0).astype(np.float32)
    elif kind == "nll":
        ids, n_ctx, nll = job["ids"], job["n_ctx"], []
        for start in range(0, len(ids) - 1, n_ctx):
            window = ids[start:start + n_ctx]
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            logits = decode(model, ctx, window, 0).astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll += [-logp[t, window[t + 1]] for t in range(len(window) - 1)]
        OUTPUTS[key] = np.array(nll)
    elif kind == "tokenize":
        vocab, ids = lc.llama_model_get_vocab(model), []
        for text in job["texts"]:
            raw = text.encode()
            buf = (lc.llama_token * (len(raw) + 8))()
            n = lc.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
            ids.append(list(buf[:n]))
        OUTPUTS[key] = np.array([i for x in ids for i in x], np.int64)
        OUTPUTS[key + "_len"] = np.array([len(x) for x in ids], np.int64)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
"""


def llama_cpp_jobs(jobs: list[dict[str, Any]]) -> list[Any]:
    """Results of `jobs` (see the module docstring), in order."""
    out = run_reference(SCRIPT, {}, jobs=[{k: (str(v) if k in ("path", "out", "lora") else v)
                                           for k, v in job.items()} for job in jobs])
    results: list[Any] = []
    for i, job in enumerate(jobs):
        if job["kind"] == "tokenize":
            flat, lengths = out[str(i)], out[f"{i}_len"]
            results.append([list(map(int, part)) for part in
                            np.split(flat, np.cumsum(lengths)[:-1])])
        else:
            results.append(out[str(i)])
    return results
