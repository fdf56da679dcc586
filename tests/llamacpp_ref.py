"""Drive llama.cpp (llama-cpp-python in the reference environment) on GGUF files we wrote.

`llama_cpp_jobs([...])` runs a list of jobs in one reference subprocess and returns one result
per job. Every model loads with a float32 KV cache and 2 threads. Jobs (dicts):

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

from tests.refenv import run_reference

SCRIPT = """
import ctypes
import llama_cpp
from llama_cpp import Llama

def load(job, n_ctx=512):
    return Llama(model_path=job["path"], lora_path=job.get("lora"), n_ctx=job.get("n_ctx", n_ctx),
                 logits_all=True, verbose=False, n_threads=2, n_threads_batch=2, type_k=0,
                 type_v=0, seed=0)

for i, job in enumerate(ARGS["jobs"]):
    kind, key = job["kind"], str(i)
    if kind == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = job["ftype"]
        params.nthread = 2
        OUTPUTS[key] = np.array(llama_cpp.llama_model_quantize(
            job["path"].encode(), job["out"].encode(), ctypes.byref(params)))
        continue
    llm = load(job)
    if kind == "greedy":
        llm.reset()
        llm.eval(job["ids"])
        out = []
        for step in range(job["n"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if step + 1 < job["n"]:
                llm.eval([nxt])
        OUTPUTS[key] = np.array(out)
    elif kind == "logits":
        llm.reset()
        llm.eval(job["ids"])
        OUTPUTS[key] = np.array(llm.scores[:len(job["ids"])], np.float32)
    elif kind == "nll":
        ids, n_ctx, nll = job["ids"], job["n_ctx"], []
        for start in range(0, len(ids) - 1, n_ctx):
            window = ids[start:start + n_ctx]
            llm.reset()
            llm.eval(window)
            logits = np.array(llm.scores[:len(window)], np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll += [-logp[t, window[t + 1]] for t in range(len(window) - 1)]
        OUTPUTS[key] = np.array(nll)
    elif kind == "tokenize":
        ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job["texts"]]
        OUTPUTS[key] = np.array([i for x in ids for i in x], np.int64)
        OUTPUTS[key + "_len"] = np.array([len(x) for x in ids], np.int64)
    del llm
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
