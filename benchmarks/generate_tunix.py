"""Tunix's KV-cache `Sampler` on SmolLM2 (greedy), timed as benchmarks/generate.py times ours.

Runs in .benchenv/tunix (benchmarks/tunix_env.sh), started by benchmarks/generate.py --tunix.
The SmolLM2 safetensors are loaded into Tunix's Llama 3 model. Its rope ignores the config's
theta (it uses 1e6, SmolLM2 has 1e5), so its tokens differ from the real model's; the work per
token is the same, which is what this measures. The sampler's own prefill and decode functions
are called on our token ids (EOS set to an id that never occurs, so every row makes the full
number of tokens). Prints one JSON line: {"prefill_<b>": s, "decode_<b>": s}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer
from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama3
from tunix.models.llama3 import params as llama3_params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=pathlib.Path, required=True)
    parser.add_argument("--ids", type=pathlib.Path, required=True)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hf = json.loads((args.model / "config.json").read_text())
    cfg = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf["rope_parameters"]["rope_theta"]), norm_eps=hf["rms_norm_eps"],
        weight_tying=hf["tie_word_embeddings"])
    model = llama3_params.create_model_from_safe_tensors(str(args.model), cfg, dtype=jnp.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    ids = np.load(args.ids)
    p, n = ids.shape[1], args.new_tokens
    sampler = sampler_lib.Sampler(
        model, tokenizer, sampler_lib.CacheConfig(cache_size=p + n + 1,
                                                  num_layers=cfg.num_layers,
                                                  num_kv_heads=cfg.num_kv_heads,
                                                  head_dim=cfg.head_dim))
    sampler.eos_ids = jnp.array([cfg.vocab_size + 7])          # never generated: no early stop
    out = {}
    for b in [int(x) for x in args.batches.split(",")]:
        def once() -> tuple[float, float]:
            state = sampler.init_sample_state(
                jnp.asarray(ids[:b], jnp.int32), include_logits=False,
                total_sampling_steps=p + n, forbidden_token_ids=None, temperature=0.0,
                top_p=None, top_k=None, seed=jax.random.PRNGKey(0), beam_size=None,
                include_logprobs=False)
            jax.block_until_ready(state.token_buffer)
            t0 = time.perf_counter()
            state = sampler._compiled_prefill_fn(sampler._flattened_transformer_state, state,
                                                 None, echo=False)
            jax.block_until_ready(state.token_buffer)
            t1 = time.perf_counter()
            state = sampler._compiled_decode_fn(sampler._flattened_transformer_state, state)
            jax.block_until_ready(state.token_buffer)
            t2 = time.perf_counter()
            assert int(state.decoding_step) >= p + n - 1, int(state.decoding_step)
            return t1 - t0, t2 - t1

        once()                                                       # compile
        pre, dec = zip(*[once() for _ in range(args.repeats)])
        out[f"prefill_{b}"], out[f"decode_{b}"] = statistics.median(pre), statistics.median(dec)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
