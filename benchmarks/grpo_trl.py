"""The TRL side of benchmarks/grpo.py, and what both sides share.

Run as a script (by grpo.py, in its own process: a clean peak-memory count) it trains TRL's
`GRPOTrainer` + PEFT for warmup + steps optimizer steps and prints one JSON object as its last
line. On the CPU it runs in the reference environment (torch CPU); on the GPU in the machine's
own Python, which then needs trl and datasets (and bitsandbytes for --quant nf4) installed.

Shared with our side (imported by grpo.py; only the standard library at import time):
- `chat_prompts`: SmolLM2's chat prompts; `token_prompts` + `synthetic_tokenizer`: prompts for a
  random-weight model (no real tokenizer exists for it): a word-level tokenizer whose word
  "t<i>" is token i (i >= 3), so both trainers tokenize, decode and pad the same way;
- `reward_even`: the reward both trainers use, a cheap verifiable one read from the completion
  ids (the share of even token ids), so scoring costs the same on both sides.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short sentence about the number {i + 7}."}]
            for i in range(n)]


def token_prompts(n: int, length: int, vocab: int) -> list[str]:
    """n prompts of `length` random words of the synthetic tokenizer (no special token)."""
    rng = random.Random(0)
    return [" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(length)) for _ in range(n)]


def synthetic_tokenizer(vocab: int):
    """A transformers fast tokenizer: <pad> (0), </s> (1, the end), <unk> (2), then word t<i> is
    token i. (Special tokens are matched inside words, so they must not look like one.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def reward_even(completion_ids, **_):
    """The share of even token ids in each completion."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def run(a: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = a["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    if a["preset"] == "smollm2":
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a["model"])
        model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
        peft_config = LoraConfig(r=16, lora_alpha=16, target_modules=a["targets"],
                                 task_type="CAUSAL_LM")
        prompts = chat_prompts(a["prompts"])
    else:
        import e2e_hf  # a sibling: HF + PEFT (+ bitsandbytes NF4) on random weights

        e2e_hf.DEVICE = a["device"]
        model = e2e_hf.build(a["config"], a["quant"], 16, 16.0)
        model.config.use_cache = True  # generation decodes with the KV cache
        peft_config = None
        tok = synthetic_tokenizer(a["config"]["vocab_size"])
        prompts = token_prompts(a["prompts"], a["prompt_len"], a["config"]["vocab_size"])
    setup_s = time.perf_counter() - t0
    n = a["prompts"] * a["generations"]
    total = a["warmup"] + a["steps"]

    class Timed(GRPOTrainer):
        """GRPOTrainer timing its generation calls (the rest of a step is the update)."""

        rollout_times: list[float] = []

        def _generate_single_turn(self, *args, **kwargs):
            sync()
            start = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            sync()
            self.rollout_times.append(time.perf_counter() - start)
            return out

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.start)

    args = GRPOConfig(output_dir=a["out"], per_device_train_batch_size=a["micro_batch"],
                      gradient_accumulation_steps=n // a["micro_batch"],
                      num_generations=a["generations"], max_completion_length=a["completion"],
                      temperature=1.0, top_k=0, max_steps=total, learning_rate=1e-5, beta=0.0,
                      loss_type="dapo", bf16=cuda, use_cpu=not cuda, report_to="none",
                      logging_steps=1, save_strategy="no", disable_tqdm=True,
                      gradient_checkpointing=a["remat"], log_completions=False)
    data = Dataset.from_dict({"prompt": prompts * total})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Timed(model=model, reward_funcs=reward_even, args=args, train_dataset=data,
                    processing_class=tok, peft_config=peft_config, callbacks=[StepTimer()])
    trainer.train()
    steps = StepTimer.times[a["warmup"]:]
    rollouts = Timed.rollout_times[a["warmup"]:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h][a["warmup"]:]
    import peft
    import transformers
    import trl

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "trl": trl.__version__}
    if a["quant"] == "nf4":
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    step = sorted(steps)[len(steps) // 2]
    rollout = sorted(rollouts)[len(rollouts) // 2]
    return {"step_s": step, "rollout_s": rollout, "update_s": step - rollout,
            "mean_length": sum(lengths) / len(lengths), "setup_s": setup_s,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads(), "versions": versions}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
