"""The `fastlora-jax` command line.

  fastlora-jax demo      fine-tune the default model (SmolLM2-135M-Instruct) on the CPU and show
                         held-out accuracy before and after; exports a PEFT adapter
  fastlora-jax train     --model DIR --data FILE [--eval_data FILE] --output_dir DIR
                         [TrainingArguments flags] [LoRA flags] [--config run.yaml]
  fastlora-jax export    --model DIR --adapter DIR --output_dir DIR --method peft|merged
  fastlora-jax chat      --model DIR [--adapter DIR] --prompt "..."
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
import time
from typing import Any

from fastlora_jax.errors import ConfigError, FastLoRAError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_PROMPT = "What is the capital of France?"

def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per run setting (launch, model/LoRA, TrainingArguments), named as the field. The
    raw text is converted by the same schema as a --config YAML file (train/schema.py)."""
    from fastlora_jax.train.args import RUN_SECTIONS
    from fastlora_jax.train.schema import describe, field_types

    for cls in RUN_SECTIONS:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, kind in field_types(cls).items():
            parser.add_argument(f"--{name}", default=None, metavar="VALUE",
                                help=f"{describe(kind)} (default {defaults[name]!r})")


def chat(model_dir: pathlib.Path, prompt: str, max_new_tokens: int, dtype: str | None,
         adapter: pathlib.Path | None = None) -> str:
    """Load a checkpoint (and adapter) and return the greedy answer to one user message."""
    from fastlora_jax import FastLanguageModel

    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, dtype=dtype)
    if tokenizer is None:
        raise ConfigError(f"{model_dir} has no tokenizer files; chat needs one")
    if adapter is not None:
        model.load_adapter(adapter)
    print(f"loaded {model_dir.name} ({model.config.num_layers} layers, "
          f"{model.config.hidden_size} hidden) in {time.perf_counter() - start:.1f}s", flush=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    print(f"user: {prompt}\nassistant: {answer}\n({len(out)} tokens in "
          f"{time.perf_counter() - start:.1f}s)", flush=True)
    return answer


def train(ns: argparse.Namespace) -> dict[str, Any]:
    """`fastlora-jax train`: flags override the --config YAML, which overrides the defaults."""
    from fastlora_jax import FastLanguageModel, SFTTrainer
    from fastlora_jax.converters.hf import checkpoint_dir
    from fastlora_jax.train.args import load_yaml, run_settings
    from fastlora_jax.train.trainer import data_summary

    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config") and v is not None}
    layers = [(load_yaml(ns.config), f"config file {str(ns.config)!r}")] if ns.config else []
    launch, model_args, args = run_settings(*layers, (flags, "command line"))
    if launch.model is None or launch.data is None:
        raise ConfigError("train needs --model (a checkpoint folder) and --data (a dataset file), "
                          "as flags or in the --config file")
    checkpoint_dir(launch.model)  # a wrong path fails here, before any process group forms
    maybe_init_distributed(launch.coordinator_address, launch.num_processes, launch.process_id)
    model, tokenizer = FastLanguageModel.from_pretrained(
        launch.model, max_seq_length=args.max_seq_length or 2048, dtype=model_args.dtype,
        load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit)
    model = FastLanguageModel.get_peft_model(
        model, r=model_args.r, lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout, target_modules=model_args.target_modules,
        use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
        use_gradient_checkpointing=model_args.use_gradient_checkpointing,
        random_state=model_args.random_state)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=launch.data,
                         eval_dataset=launch.eval_data, args=args)
    print(f"data: {data_summary(trainer.data_stats)}; {trainer.total_steps} steps", flush=True)
    stats = trainer.train(resume_from_checkpoint=launch.resume_from_checkpoint)
    adapter = pathlib.Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter, tokenizer, overwrite=True)
    evaluated = (f", eval loss {stats['eval_loss']:.4f}" if "eval_loss" in stats else "")
    print(f"done: {stats['global_step']} steps, final loss {stats['final_loss']:.4f}"
          f"{evaluated}, {stats['train_tokens_per_second']:.0f} tokens/s; adapter: {adapter}; "
          f"loss curve: {pathlib.Path(args.output_dir) / 'loss.png'}", flush=True)
    return stats


def maybe_init_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """One call for multi-process launches: jax.distributed when a coordinator is given."""
    if coordinator is None:
        return
    import jax

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def export(ns: argparse.Namespace) -> None:
    from fastlora_jax import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(ns.model, dtype=ns.dtype)
    model.load_adapter(ns.adapter)
    if ns.method == "peft":
        model.save_pretrained(ns.output_dir, tokenizer, overwrite=ns.overwrite)
    else:
        model.save_pretrained_merged(ns.output_dir, tokenizer, save_method="merged_16bit",
                                     dtype=ns.merged_dtype, overwrite=ns.overwrite)
    print(f"wrote {ns.method} export to {ns.output_dir}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune the default model on a generated task (CPU)")
    demo.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    demo.add_argument("--output_dir", type=pathlib.Path, default=REPO_ROOT / "outputs" / "demo")
    demo.add_argument("--max_steps", type=int, default=-1)

    t = sub.add_parser("train", help="LoRA/QLoRA SFT on a local dataset file")
    t.add_argument("--config", type=pathlib.Path, default=None, help="run.yaml with these flags")
    _add_run_flags(t)

    e = sub.add_parser("export", help="write a PEFT adapter or a merged 16-bit checkpoint")
    e.add_argument("--model", type=pathlib.Path, required=True)
    e.add_argument("--adapter", type=pathlib.Path, required=True)
    e.add_argument("--output_dir", type=pathlib.Path, required=True)
    e.add_argument("--method", choices=("peft", "merged"), default="merged")
    e.add_argument("--merged_dtype", default=None, help="bfloat16 (default) | float16 | float32")
    e.add_argument("--dtype", default="float32", help="compute dtype while merging")
    e.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("chat", help="greedy answer to one chat message")
    c.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    c.add_argument("--adapter", type=pathlib.Path, default=None)
    c.add_argument("--prompt", default=DEFAULT_PROMPT)
    c.add_argument("--max_new_tokens", type=int, default=64)
    c.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastlora_jax").setLevel(logging.INFO)
    try:
        if ns.command == "demo":
            from fastlora_jax.demo import run_demo

            run_demo(ns.model, ns.output_dir, max_steps=ns.max_steps)
        elif ns.command == "train":
            train(ns)
        elif ns.command == "export":
            export(ns)
        elif ns.command == "chat":
            chat(ns.model, ns.prompt, ns.max_new_tokens, ns.dtype, ns.adapter)
    except FastLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
