"""The Tunix side of benchmarks/grpo.py: Tunix's `GRPOLearner` (the JAX peer) on SmolLM2.

Runs in .benchenv/tunix (benchmarks/tunix_env.sh: google-tunix, qwix, its own flax), started by
grpo.py in its own process; prints one JSON object as its last line, the fields grpo_trl.py
prints. The run matches the other two sides' shapes: the same chat prompts (rendered by the
model's chat template, as TRL does), --generations completions of each (temperature 1, no top-k,
top-p 1, up to --completion tokens, the sampler stopping at the tokenizer's end token), the same
reward (`grpo_trl.reward_even`, on the completion text tokenized again: Tunix hands reward
functions text only), one optimizer step per batch over micro-batches of --micro_batch
completions, beta 0 (no reference pass), one iteration, token-mean loss aggregation (DAPO's
normalization, the loss the other sides run), AdamW at a constant 1e-5 (the others decay it
linearly: the same work) with gradient clipping at 1.0, LoRA r=16 alpha=16 on all seven
projections through qwix (Tunix's LoRA), float32, no remat.

Presets: smollm2 (the measured one) and tiny (a tiny random Llama 3 with the synthetic word-level
tokenizer and token prompts of grpo_trl.py: the self-test of this driver).

The SmolLM2 safetensors are loaded into Tunix's Llama 3 model (as benchmarks/generate_tunix.py
does). That model's rope ignores the config's theta (it uses 1e6, SmolLM2 has 1e5), so its
samples differ from the real model's; the work per token is the same, and the mean completion
length is reported beside the times so the work per step can be compared.

Timing: a step is one `_run_global_step` (rollout, rewards, advantages, the update; the LoRA
parameters are waited for at its end), the rollout is `RLCluster.generate` (its tokens come back
to the host, so it has finished when it returns). Completion lengths count the end token when the
sampler stopped at one (Tunix's token lists leave it out; the other sides count it).
"""

from __future__ import annotations

import json
import pathlib
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import grpo_trl  # noqa: E402  (a sibling; only the standard library at import time)


def llama3_config(hf: dict):
    """Tunix's Llama 3 config with the shapes of an HF Llama config (dict)."""
    from tunix.models.llama3 import model as llama3

    theta = hf.get("rope_parameters", {}).get("rope_theta", hf.get("rope_theta"))
    return llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(theta),
        norm_eps=hf["rms_norm_eps"], weight_tying=hf["tie_word_embeddings"])


def run(a: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import qwix
    import transformers
    from flax import nnx
    from transformers import AutoTokenizer
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    if a["preset"] not in ("smollm2", "tiny"):
        raise SystemExit(f"the Tunix side runs the smollm2 and tiny presets, not {a['preset']}")
    t0 = time.perf_counter()
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),  # Auto axes, as Tunix's own meshes are
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    if a["preset"] == "smollm2":
        model_dir = pathlib.Path(a["model"])
        config = llama3_config(json.loads((model_dir / "config.json").read_text()))
        base = llama3_params.create_model_from_safe_tensors(str(model_dir), config, mesh=mesh,
                                                            dtype=jnp.float32)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        prompts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                   for p in grpo_trl.chat_prompts(a["prompts"])]
    else:
        base = llama3.Llama3(llama3_config(a["config"]), rngs=nnx.Rngs(0))
        tok = grpo_trl.synthetic_tokenizer(a["config"]["vocab_size"])
        prompts = grpo_trl.token_prompts(a["prompts"], a["prompt_len"],
                                         a["config"]["vocab_size"])
    lora = qwix.LoraProvider(module_path=".*(" + "|".join(a["targets"]) + ")", rank=16,
                             alpha=16.0)
    policy = qwix.apply_lora_to_model(base, lora, rngs=nnx.Rngs(0), **base.get_model_input())
    prompt_len = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    setup_s = time.perf_counter() - t0
    n = a["prompts"] * a["generations"]
    total = a["warmup"] + a["steps"]

    rollout_s, lengths = [], []  # of the step under way: each rollout call's time and tokens
    steps = []  # per step: (step s, rollout s, mean completion tokens)

    class TimedCluster(rl_cluster_lib.RLCluster):
        """RLCluster timing its rollouts and counting their tokens."""

        def generate(self, *args, **kwargs):
            start = time.perf_counter()
            out = super().generate(*args, **kwargs)
            jax.block_until_ready(out.tokens)
            rollout_s.append(time.perf_counter() - start)
            lengths.extend(len(t) + (len(t) < a["completion"]) for t in out.tokens)
            return out

    class TimedLearner(grpo_learner.GRPOLearner):
        """GRPOLearner timing each optimizer step (one global step here)."""

        def _run_global_step(self, *args, **kwargs):
            start = time.perf_counter()
            super()._run_global_step(*args, **kwargs)
            jax.block_until_ready(nnx.state(self.rl_cluster.actor_trainer.model,
                                            nnx.LoRAParam))
            steps.append((time.perf_counter() - start, sum(rollout_s), statistics.mean(lengths)))
            rollout_s.clear(), lengths.clear()

    def reward(prompts, completions, **_):
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
        return grpo_trl.reward_even(ids)

    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                    optax.adamw(1e-5, weight_decay=0.0)),
        eval_every_n_steps=10**9, max_steps=total, mini_batch_size=a["prompts"],
        train_micro_batch_size=a["micro_batch"] // a["generations"],
        rollout_micro_batch_size=a["prompts"], compute_logps_micro_batch_size=a["prompts"])
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=a["completion"], max_prompt_length=prompt_len,
        kv_cache_size=prompt_len + a["completion"] + 1, temperature=1.0, top_p=1.0, top_k=None)
    roles = {rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
             rl_cluster_lib.Role.ROLLOUT: mesh}
    cluster = TimedCluster(
        actor=policy, reference=None, tokenizer=tok,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh=roles, rollout_engine="vanilla", offload_to_cpu=False,
            training_config=training, rollout_config=rollout))
    algo = grpo_learner.GRPOConfig(num_generations=a["generations"], num_iterations=1,
                                   beta=0.0, epsilon=0.2, loss_agg_mode="token-mean")
    learner = TimedLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward)
    # A batch is {"prompts": array of strings}, as Tunix's data pipelines yield it (the learner
    # repeats each leaf num_generations times).
    learner.train([{"prompts": np.array(prompts)} for _ in range(total)])
    if len(steps) != total:
        raise SystemExit(f"Tunix ran {len(steps)} optimizer steps, not {total}")
    from importlib import metadata

    kept = steps[a["warmup"]:]
    step = statistics.median(s for s, _, _ in kept)
    rollout = statistics.median(r for _, r, _ in kept)
    return {"step_s": step, "rollout_s": rollout, "update_s": step - rollout,
            "mean_length": statistics.mean(m for _, _, m in kept),
            "setup_s": setup_s, "samples_per_step": n, "prompt_tokens": prompt_len,
            "peak_bytes": None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": None,
            "versions": {"google-tunix": metadata.version("google-tunix"),
                         "qwix": metadata.version("qwix"), "flax": metadata.version("flax"),
                         "jax (tunix env)": jax.__version__,
                         "transformers (tunix env)": transformers.__version__}}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
