"""The default demo: teach SmolLM2-135M-Instruct a made-up tagging rule with LoRA on the CPU.

The task is generated (deterministic, seed 0): each sentence mentions an animal, a vehicle or a
food, and the answer is that category's secret tag — `alpha`, `beta` or `gamma`, a mapping the
base model cannot know. The held-out sentences name nouns that no training sentence contains
(`HELD_OUT`), so a correct answer needs the category the base model already knows plus the tag
the adapter learnt, not a memorised noun -> tag lookup. Accuracy is exact match of the greedy
answer's first token (each tag is one token), before and after training; chance is 1/3.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import random
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import ConfigError

# tag -> nouns of its category seen in training
TRAIN_NOUNS = {
    "alpha": ["dog", "cat", "horse", "rabbit", "fox", "owl", "goat", "tiger", "duck", "sheep",
              "lion", "mouse"],
    "beta": ["car", "truck", "bicycle", "train", "boat", "bus", "tractor", "scooter", "van",
             "plane", "taxi", "ship"],
    "gamma": ["apple", "bread", "cheese", "soup", "banana", "cake", "rice", "carrot", "pizza",
              "pear", "pasta", "cookie"],
}
# tag -> nouns only the held-out sentences use
HELD_OUT_NOUNS = {
    "alpha": ["zebra", "wolf", "frog", "bear"],
    "beta": ["motorcycle", "helicopter", "tram", "canoe"],
    "gamma": ["sandwich", "orange", "potato", "burger"],
}
ADJECTIVES = ["small", "old", "red", "quiet", "fast", "heavy", "bright", "tired", "new", "strange"]
PLACES = ["in the park", "near the river", "by the school", "on the hill", "in the city",
          "at the market", "behind the house", "in the garden"]
VERBS = ["is seen", "waits", "appears", "stays", "is found"]
SYSTEM = "You tag sentences."
QUESTION = "Secret tag (alpha, beta or gamma) of: {sentence}"


def make_examples(n: int, seed: int, *, held_out: bool = False) -> list[dict[str, Any]]:
    """`n` distinct chat examples {"messages": [...], "tag": ..., "noun": ...} over the training
    nouns, or over the held-out nouns (`held_out=True`)."""
    nouns = HELD_OUT_NOUNS if held_out else TRAIN_NOUNS
    combos = [(tag, noun, adj, verb, place)
              for tag, names in nouns.items() for noun in names
              for adj, verb, place in itertools.product(ADJECTIVES, VERBS, PLACES)]
    rng = random.Random(seed)
    rng.shuffle(combos)
    out = []
    for tag, noun, adj, verb, place in combos[:n]:
        sentence = f"The {adj} {noun} {verb} {place}."
        out.append({"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": QUESTION.format(sentence=sentence)},
                                 {"role": "assistant", "content": tag}], "tag": tag,
                    "noun": noun})
    return out


def write_jsonl(examples: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": e["messages"]}) + "\n" for e in examples))
    return path


def tag_accuracy(model: Any, tokenizer: Any, examples: list[dict[str, Any]]) -> float:
    """Exact match of the greedy first answer token against each example's tag token."""
    prompts = [tokenizer(tokenizer.apply_chat_template(e["messages"][:-1], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for e in examples]
    answers = [tokenizer(e["tag"], add_special_tokens=False)["input_ids"][0] for e in examples]
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    last = np.asarray([len(p) - 1 for p in prompts])
    logits = model(jnp.asarray(ids))                                   # [N, width, V]
    picked = np.asarray(jnp.argmax(logits[jnp.arange(len(prompts)), jnp.asarray(last)], axis=-1))
    return float(np.mean(picked == np.asarray(answers)))


def run_demo(model_dir: pathlib.Path, output_dir: pathlib.Path, *, train_examples: int = 500,
             eval_examples: int = 100, max_steps: int = -1) -> dict[str, Any]:
    """Fine-tune, evaluate before/after, export the PEFT adapter. Returns the numbers.

    The held-out sentences are also the trainer's eval_dataset: their loss is evaluated every
    10 steps (log.jsonl, TensorBoard, loss.png)."""
    from fastlora_jax import FastLanguageModel, SFTTrainer, TrainingArguments
    from fastlora_jax.converters.atomic import write_text_atomic

    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / "demo_result.json").exists():
            raise ConfigError(f"{str(output_dir)!r} is not empty and holds no earlier demo run; "
                              f"choose an empty --output_dir")
        shutil.rmtree(output_dir)  # a previous demo run: start afresh
    train = make_examples(train_examples, seed=0)
    held_out = make_examples(eval_examples, seed=1, held_out=True)
    data = write_jsonl(train, output_dir / "data" / "train.jsonl")
    eval_data = write_jsonl(held_out, output_dir / "data" / "held_out.jsonl")
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=128,
                                                         dtype="float32")
    before = tag_accuracy(model, tokenizer, held_out)
    print(f"held-out tag accuracy before training: {before:.1%} ({len(held_out)} examples whose "
          f"nouns no training example contains)", flush=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, num_train_epochs=1,
                             max_steps=max_steps, learning_rate=2e-3, warmup_steps=3,
                             lr_scheduler_type="linear", packing=True,
                             train_on_responses_only=True, logging_steps=1, save_steps=0,
                             eval_strategy="steps", eval_steps=10, per_device_eval_batch_size=16,
                             seed=3407, use_gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=str(data),
                         eval_dataset=str(eval_data), args=args)
    stats = trainer.train()
    after = tag_accuracy(model, tokenizer, held_out)
    adapter = output_dir / "adapter"
    model.save_pretrained(adapter, tokenizer, overwrite=True)
    result = {"accuracy_before": before, "accuracy_after": after, "train": stats,
              "held_out_nouns": sorted({e["noun"] for e in held_out}), "adapter": str(adapter)}
    write_text_atomic(output_dir / "demo_result.json", json.dumps(result, indent=2))
    print(f"held-out tag accuracy after training: {after:.1%}; loss {stats['final_loss']:.3f}, "
          f"held-out loss {stats['eval_loss']:.3f}; {stats['global_step']} steps in "
          f"{stats['train_runtime']:.0f}s; adapter: {adapter}", flush=True)
    return result
