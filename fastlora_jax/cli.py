"""The `fastlora-jax` command line.

  fastlora-jax demo                 the README's main job on the default model
  fastlora-jax chat --model DIR --prompt "..."   greedy answer to one chat message
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from fastlora_jax.errors import FastLoRAError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_PROMPT = "What is the capital of France?"


def chat(model_dir: pathlib.Path, prompt: str, max_new_tokens: int, dtype: str | None) -> str:
    """Load a checkpoint and return the greedy answer to one user message."""
    from fastlora_jax import FastLanguageModel

    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, dtype=dtype)
    if tokenizer is None:
        raise FastLoRAError(f"{model_dir} has no tokenizer files; chat needs one")
    print(f"loaded {model_dir.name} ({model.config.num_layers} layers, "
          f"{model.config.hidden_size} hidden) in {time.perf_counter() - start:.1f}s", flush=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    print(f"user: {prompt}\nassistant: {answer}\n({len(out)} tokens in "
          f"{time.perf_counter() - start:.1f}s)", flush=True)
    return answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the default model (SmolLM2-135M-Instruct)")
    demo.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    c = sub.add_parser("chat", help="greedy answer to one chat message")
    c.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    c.add_argument("--prompt", default=DEFAULT_PROMPT)
    c.add_argument("--max_new_tokens", type=int, default=64)
    c.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastlora_jax").setLevel(logging.INFO)
    try:
        if args.command == "demo":
            chat(args.model, DEFAULT_PROMPT, 32, None)
        elif args.command == "chat":
            chat(args.model, args.prompt, args.max_new_tokens, args.dtype)
    except FastLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
