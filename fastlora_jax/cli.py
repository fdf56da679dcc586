"""The `fastlora-jax` command line.

  fastlora-jax demo      fine-tune the default model (SmolLM2-135M-Instruct) on the CPU and show
                         held-out accuracy before and after; exports a PEFT adapter
  fastlora-jax train     --model DIR --data FILE [--eval_data FILE] --output_dir DIR
                         [TrainingArguments flags] [LoRA flags] [--config run.yaml]
  fastlora-jax grpo      --model DIR --data FILE --reward_funcs file.py:fn[,...] [GRPOConfig flags]
  fastlora-jax dpo       --model DIR --data FILE [DPOConfig flags]
  fastlora-jax export    --model DIR [--adapter DIR] --output_dir DIR --method peft|merged|gguf
                         [--quantization q4_k_m] [--lora]
  fastlora-jax chat      --model DIR [--adapter DIR] [--load_in_4bit] [--prompt "..."]
                         interactive multi-turn chat (streamed); --prompt answers once
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
from typing import Any

from fastlora_jax import chat
from fastlora_jax.errors import ConfigError, FastLoRAError
from fastlora_jax.model_flags import load_peft_model

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"

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


def train(ns: argparse.Namespace) -> dict[str, Any]:
    """`fastlora-jax train`: flags override the --config YAML, which overrides the defaults."""
    from fastlora_jax import SFTTrainer
    from fastlora_jax.converters.hf import checkpoint_dir
    from fastlora_jax.train import distributed
    from fastlora_jax.train.args import load_yaml, run_settings
    from fastlora_jax.train.trainer import data_summary

    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config") and v is not None}
    layers = [(load_yaml(ns.config), f"config file {str(ns.config)!r}")] if ns.config else []
    launch, model_args, args = run_settings(*layers, (flags, "command line"))
    if launch.model is None or launch.data is None:
        raise ConfigError("train needs --model (a checkpoint folder) and --data (a dataset file), "
                          "as flags or in the --config file")
    checkpoint_dir(launch.model)  # a wrong path fails here, before any process group forms
    distributed.initialize(distributed.find_launch(launch.coordinator_address,
                                                   launch.num_processes, launch.process_id))
    if args.mesh is not None:
        import jax

        # a mesh that does not fit this launch's devices fails here, before the model loads
        args.mesh.shape(jax.device_count())
    model, tokenizer = load_peft_model(launch.model, model_args, args.max_seq_length or 2048)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=launch.data,
                         eval_dataset=launch.eval_data, args=args)
    main = distributed.is_main_process()  # only process 0 prints and writes the adapter
    if main:
        print(f"data: {data_summary(trainer.data_stats)}; {trainer.total_steps} steps",
              flush=True)
    stats = trainer.train(resume_from_checkpoint=launch.resume_from_checkpoint)
    adapter = pathlib.Path(args.output_dir) / "adapter"
    if not main:
        return stats
    model.save_pretrained(adapter, tokenizer, overwrite=True)
    evaluated = (f", eval loss {stats['eval_loss']:.4f}" if "eval_loss" in stats else "")
    print(f"done: {stats['global_step']} steps, final loss {stats['final_loss']:.4f}"
          f"{evaluated}, {stats['train_tokens_per_second']:.0f} tokens/s; adapter: {adapter}; "
          f"loss curve: {pathlib.Path(args.output_dir) / 'loss.png'}", flush=True)
    return stats


def export(ns: argparse.Namespace) -> None:
    from fastlora_jax import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(ns.model, dtype=ns.dtype)
    if ns.adapter is not None:
        model.load_adapter(ns.adapter)
    if ns.method == "gguf":
        path = model.save_pretrained_gguf(ns.output_dir, tokenizer,
                                          quantization_method=ns.quantization,
                                          save_method="lora" if ns.lora else "merged",
                                          overwrite=ns.overwrite)
        print(f"wrote {path}", flush=True)
        return
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
    demo.add_argument("--output_dir", type=pathlib.Path, default=None,
                      help="default outputs/demo (sft) or outputs/demo_grpo (grpo)")
    demo.add_argument("--max_steps", type=int, default=-1)
    demo.add_argument("--task", choices=("sft", "grpo"), default="sft",
                      help="sft: the tagging task; grpo: RL on generated arithmetic")

    t = sub.add_parser("train", help="LoRA/QLoRA SFT on a local dataset file")
    t.add_argument("--config", type=pathlib.Path, default=None, help="run.yaml with these flags")
    _add_run_flags(t)

    from fastlora_jax import rl_cli
    from fastlora_jax.train.rl_config import DPOConfig, GRPOConfig

    rl_cli.add_parser(sub, "grpo", GRPOConfig, "GRPO on prompts with reward functions")
    rl_cli.add_parser(sub, "dpo", DPOConfig, "DPO on prompt/chosen/rejected pairs")

    e = sub.add_parser("export", help="write a PEFT adapter, a merged 16-bit checkpoint, or a "
                                      "GGUF for llama.cpp / Ollama")
    e.add_argument("--model", type=pathlib.Path, required=True)
    e.add_argument("--adapter", type=pathlib.Path, default=None,
                   help="PEFT adapter folder to merge or export (gguf: optional)")
    e.add_argument("--output_dir", type=pathlib.Path, required=True)
    e.add_argument("--method", choices=("peft", "merged", "gguf"), default="merged")
    e.add_argument("--quantization", default="q8_0",
                   help="gguf: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k_m | "
                        "q5_k_m | q6_k")
    e.add_argument("--lora", action="store_true",
                   help="gguf: write the adapter alone (adapter.gguf, for llama.cpp --lora)")
    e.add_argument("--merged_dtype", default=None, help="bfloat16 (default) | float16 | float32")
    e.add_argument("--dtype", default="float32", help="compute dtype while merging")
    e.add_argument("--overwrite", action="store_true")

    chat.add_arguments(sub.add_parser("chat", help="chat with a model (interactive; --prompt "
                                                   "for one answer)"), DEFAULT_MODEL)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastlora_jax").setLevel(logging.INFO)
    try:
        if ns.command == "demo" and ns.task == "grpo":
            from fastlora_jax.demo_grpo import run_grpo_demo

            run_grpo_demo(ns.model, ns.output_dir or REPO_ROOT / "outputs" / "demo_grpo",
                          max_steps=ns.max_steps)
        elif ns.command == "demo":
            from fastlora_jax.demo import run_demo

            run_demo(ns.model, ns.output_dir or REPO_ROOT / "outputs" / "demo",
                     max_steps=ns.max_steps)
        elif ns.command in ("grpo", "dpo"):
            from fastlora_jax import rl_cli

            rl_cli.run(ns)
        elif ns.command == "train":
            train(ns)
        elif ns.command == "export":
            export(ns)
        elif ns.command == "chat":
            chat.run(ns)
    except FastLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
