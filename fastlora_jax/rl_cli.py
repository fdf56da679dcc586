"""`fastlora-jax grpo` and `fastlora-jax dpo`: flags named like GRPOConfig / DPOConfig fields.

  fastlora-jax grpo --model DIR --data FILE --reward_funcs rewards.py:correct,rewards.py:format
                    --output_dir DIR [GRPOConfig flags] [LoRA flags] [--config run.yaml]
  fastlora-jax dpo  --model DIR --data FILE --output_dir DIR [DPOConfig flags] [LoRA flags]

A flag overrides the YAML file, which overrides the defaults; unknown YAML keys are errors. List
fields (reward_weights, loss_type, loss_weights) take comma-separated values.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import types
import typing
from typing import Any

from fastlora_jax.model_flags import MODEL_FLAGS, _bool, load_peft_model
from fastlora_jax.errors import ConfigError

COMMON = ("model", "data", "config", "resume_from_checkpoint")


def _converter(kind: Any) -> Any:
    """argparse type for a dataclass field's annotation (Optional and lists included)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and args:
        if any(typing.get_origin(a) is list for a in args):
            inner = typing.get_args(next(a for a in args if typing.get_origin(a) is list))[0]
            return lambda text: [inner(v.strip()) for v in text.split(",")]
        kind = args[0]
    if typing.get_origin(kind) is list:
        inner = typing.get_args(kind)[0]
        return lambda text: [inner(v.strip()) for v in text.split(",")]
    return {bool: _bool, int: int, float: float}.get(kind, str)


def add_parser(sub: Any, name: str, config_cls: type, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", type=pathlib.Path, default=None, help="run.yaml with these flags")
    p.add_argument("--model", default=None, help="checkpoint folder")
    p.add_argument("--data", default=None, help="dataset file (.json/.jsonl/.parquet/.csv)")
    p.add_argument("--resume_from_checkpoint", type=_bool, default=False)
    if name == "grpo":
        p.add_argument("--reward_funcs", default=None,
                       help="comma-separated file.py:function entries")
    for flag, default in MODEL_FLAGS.items():
        conv = _bool if isinstance(default, bool) else int if isinstance(default, int) else \
            float if isinstance(default, float) else str
        p.add_argument(f"--{flag}", type=conv, default=None, help=f"(default {default!r})")
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name == "mesh":
            continue
        p.add_argument(f"--{field.name}", type=_converter(hints[field.name]), default=None,
                       help=f"(default {field.default!r})")


def run(ns: argparse.Namespace) -> dict[str, Any]:
    """Load the model, attach LoRA, build the config and trainer, train, save the adapter."""
    from fastlora_jax.train.args import load_yaml
    from fastlora_jax.train.rl_config import DPOConfig, GRPOConfig

    values: dict[str, Any] = load_yaml(ns.config) if ns.config else {}
    values.update({k: v for k, v in vars(ns).items() if k not in ("command", "config")
                   and v is not None})
    resume = bool(values.pop("resume_from_checkpoint", False))
    model_dir, data = values.pop("model", None), values.pop("data", None)
    if model_dir is None or data is None:
        raise ConfigError(f"{ns.command} needs --model (a checkpoint folder) and --data (a "
                          f"dataset file)")
    reward_funcs = values.pop("reward_funcs", None)
    if ns.command == "grpo" and not reward_funcs:
        raise ConfigError("grpo needs --reward_funcs file.py:function[,file.py:function...]")
    model_kw = {k: values.pop(k, default) for k, default in MODEL_FLAGS.items()}
    config_cls = GRPOConfig if ns.command == "grpo" else DPOConfig
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise ConfigError(f"{ns.config or 'command line'}: unknown {ns.command} argument(s) "
                          f"{unknown}")
    args = config_cls(**values)
    model, tokenizer = load_peft_model(model_dir, model_kw)
    if ns.command == "grpo":
        from fastlora_jax.train.grpo_trainer import GRPOTrainer

        specs = reward_funcs if isinstance(reward_funcs, list) else str(reward_funcs).split(",")
        trainer = GRPOTrainer(model, [s.strip() for s in specs], args=args, train_dataset=data,
                              processing_class=tokenizer)
    else:
        from fastlora_jax.train.dpo_trainer import DPOTrainer

        trainer = DPOTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
    print(f"{ns.command}: {trainer.total_steps} optimizer steps", flush=True)
    stats = trainer.train(resume_from_checkpoint=resume)
    adapter = pathlib.Path(args.output_dir) / "adapter"
    model.save_pretrained(adapter, tokenizer, overwrite=True)
    print(f"done: {stats['global_step']} steps in {stats['train_runtime']:.0f}s; adapter: "
          f"{adapter}; curves: {pathlib.Path(args.output_dir) / 'loss.png'}", flush=True)
    return stats
