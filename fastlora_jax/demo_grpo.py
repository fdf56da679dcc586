"""The GRPO demo: teach SmolLM2-135M-Instruct to answer sums with just the number, on the CPU.

The task is generated (seed 0): "{a} + {b} = ?" with a in 1..29 and b in 1..9, answers cut at 12
tokens. The base model answers in sentences ("The answer is 11."), so its held-out exact-match
accuracy (the greedy answer, stripped, is the sum) starts at zero. Two verifiable rewards drive
GRPO: `correct` (1 when the last number in the answer is the sum) and `concise` (up to 0.5 for
an answer that ends within few tokens, read from the completion's token ids: 0.5 at two tokens,
falling to 0 at the budget; 0 for an answer the budget cut). Held-out problems are new pairs;
accuracy and mean reward are measured with greedy decoding before and after training (30 steps by
default). Mean reward and right sums rise; in the measured run the policy converged on restating
the sum ("21 + 2 = 23"), so exact match (the bare number) can stay low while the sum is right.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import shutil
from typing import Any

from fastlora_jax.converters.atomic import write_text_atomic
from fastlora_jax.errors import ConfigError

QUESTION = "{a} + {b} = ?"
NUMBER = re.compile(r"-?\d+")
MAX_TOKENS = 12


def make_problems(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` distinct problems {"prompt": chat messages, "answer": str}."""
    pairs = [(a, b) for a in range(1, 30) for b in range(1, 10)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": [{"role": "user", "content": QUESTION.format(a=a, b=b)}],
             "answer": str(a + b)} for a, b in pairs[:n]]


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1 when the last number in the answer is the sum."""
    out = []
    for c, a in zip(completions, answer):
        numbers = NUMBER.findall(_text(c))
        out.append(1.0 if numbers and numbers[-1] == a else 0.0)
    return out


def concise_reward(eos_token_id: int) -> Any:
    """The `concise` reward for a tokenizer's end-of-turn id (see the module docstring)."""

    def concise(completion_ids: list[list[int]], **_: Any) -> list[float]:
        out = []
        for ids in completion_ids:
            ended = bool(ids) and ids[-1] == eos_token_id
            out.append(0.5 * min(1.0, (MAX_TOKENS - len(ids)) / (MAX_TOKENS - 2))
                       if ended else 0.0)
        return out

    return concise


def evaluate(trainer: Any, problems: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy answers to `problems`: exact-match accuracy and mean total reward."""
    import dataclasses

    from fastlora_jax.train.grpo_trainer import tokenize_prompt

    tok = trainer.tokenizer
    prompts = [tokenize_prompt(tok, p["prompt"], None) for p in problems]
    greedy = dataclasses.replace(trainer.sampling, do_sample=False)
    ids = trainer.rollout(trainer.step_config, trainer.model.params(),
                          trainer.model.lora_params(), prompts, greedy, 0)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    answers = [p["answer"] for p in problems]
    right = correct(texts, answers)
    short = concise_reward(tok.eos_token_id)(ids)
    exact = [float(t.strip() == a) for t, a in zip(texts, answers)]
    return {"accuracy": sum(exact) / len(exact),
            "mean_reward": sum(a + b for a, b in zip(right, short)) / len(right),
            "correct_reward": sum(right) / len(right),
            "examples": [{"prompt": p["prompt"][-1]["content"], "answer": t}
                         for p, t in zip(problems[:3], texts[:3])]}


def run_grpo_demo(model_dir: pathlib.Path, output_dir: pathlib.Path, *, max_steps: int = -1,
                  train_prompts: int = 200, eval_prompts: int = 61) -> dict[str, Any]:
    """GRPO-train, evaluate before/after, export the PEFT adapter. Returns the numbers."""
    from datasets import Dataset

    from fastlora_jax import FastLanguageModel, GRPOConfig, GRPOTrainer

    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / "demo_result.json").exists():
            raise ConfigError(f"{str(output_dir)!r} is not empty and holds no earlier demo run; "
                              f"choose an empty --output_dir")
        shutil.rmtree(output_dir)
    problems = make_problems(train_prompts + eval_prompts, seed=0)
    train, held_out = problems[:train_prompts], problems[train_prompts:]
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=256,
                                                         dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    args = GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=16,
                      gradient_accumulation_steps=2, num_generations=8,
                      max_completion_length=MAX_TOKENS,
                      max_steps=max_steps if max_steps > 0 else 30, learning_rate=1e-4,
                      warmup_steps=2, lr_scheduler_type="constant_with_warmup", beta=0.0,
                      loss_type="dapo", temperature=0.7, logging_steps=1, save_steps=0,
                      num_completions_to_print=4, seed=3407,
                      use_gradient_checkpointing=False)
    trainer = GRPOTrainer(model, [correct, concise_reward(tokenizer.eos_token_id)], args=args,
                          train_dataset=Dataset.from_list(train), processing_class=tokenizer)
    before = evaluate(trainer, held_out)
    print(f"held-out before GRPO: exact-match accuracy {before['accuracy']:.1%}, sum right "
          f"{before['correct_reward']:.1%}, mean reward {before['mean_reward']:.3f} "
          f"({len(held_out)} sums); e.g. "
          f"{before['examples'][0]['answer']!r}", flush=True)
    stats = trainer.train()
    after = evaluate(trainer, held_out)
    adapter = output_dir / "adapter"
    model.save_pretrained(adapter, tokenizer, overwrite=True)
    result = {"before": before, "after": after, "train": stats, "adapter": str(adapter)}
    write_text_atomic(output_dir / "demo_result.json", json.dumps(result, indent=2))
    print(f"held-out after GRPO: exact-match accuracy {after['accuracy']:.1%}, sum right "
          f"{after['correct_reward']:.1%}, mean reward {after['mean_reward']:.3f}; e.g. {after['examples'][0]['answer']!r}; "
          f"{stats['global_step']} steps in {stats['train_runtime']:.0f}s; adapter: {adapter}",
          flush=True)
    return result
