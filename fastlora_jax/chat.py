"""`fastlora-jax chat`: talk to a model through its tokenizer's chat template, answers streamed.

Interactive by default: each line is a user turn; the whole conversation goes through the chat
template every turn, so the model sees the history. `/reset` starts over, `/exit` (or end of
input) quits. `--prompt` answers one message and exits. The weights are prepared once
(`Generator`), and prompt / cache lengths are bucketed, so turns recompile only when the
conversation outgrows a bucket.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, TextIO

from fastlora_jax.errors import ConfigError, GenerationError

DEFAULT_MAX_NEW_TOKENS = 256
SAMPLING_FLAGS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                  "repetition_penalty": float}


def add_arguments(parser: argparse.ArgumentParser, default_model: pathlib.Path) -> None:
    """The chat command's flags (generation options carry `generate`'s names)."""
    parser.add_argument("--model", type=pathlib.Path, default=default_model)
    parser.add_argument("--adapter", type=pathlib.Path, default=None,
                        help="a PEFT adapter folder to apply")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--max_seq_length", type=int, default=4096,
                        help="the longest conversation (tokens) the cache holds")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: auto)")
    parser.add_argument("--load_in_4bit", action="store_true", help="NF4 frozen weights")
    parser.add_argument("--load_in_8bit", action="store_true", help="int8 frozen weights")
    parser.add_argument("--merge_adapters", action="store_true",
                        help="fold the adapter into a dense copy of the weights")
    parser.add_argument("--do_sample", action="store_true")
    for name, kind in SAMPLING_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help="(default: the model's generation_config)" +
                                 ("; 0 = off" if name == "top_k" else ""))
    parser.add_argument("--seed", type=int, default=None)


class ChatSession:
    """A conversation: messages so far, and the generator on the model's prepared weights."""

    def __init__(self, model: Any, tokenizer: Any, *, system: str | None = None,
                 merge_adapters: bool = False, options: dict[str, Any] | None = None) -> None:
        from fastlora_jax.generation import Generator

        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("the tokenizer has no chat template; chat needs one (a base model "
                              "without one cannot hold a conversation)")
        self.tokenizer = tokenizer
        self.generator = Generator(model, tokenizer=tokenizer, merge_adapters=merge_adapters)
        self.system = system
        self.options = options or {}
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True,
                                                  tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reply(self, message: str, on_piece: Any = None) -> tuple[str, int]:
        """The answer to `message` (streamed to on_piece) and its token count. On an error the
        conversation is left as it was."""
        from fastlora_jax.generation import TextStreamer

        self.messages.append({"role": "user", "content": message})
        try:
            streamer = None if on_piece is None else TextStreamer(self.tokenizer,
                                                                   callback=on_piece)
            out = self.generator(self.prompt_ids(), streamer=streamer, **self.options)
        except GenerationError:
            self.messages.pop()
            raise
        answer = out.texts[0]
        self.messages.append({"role": "assistant", "content": answer})
        return answer, len(out.tokens[0])


def _load(ns: argparse.Namespace) -> ChatSession:
    from fastlora_jax import FastLanguageModel

    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        ns.model, max_seq_length=ns.max_seq_length, dtype=ns.dtype,
        load_in_4bit=ns.load_in_4bit, load_in_8bit=ns.load_in_8bit)
    if tokenizer is None:
        raise ConfigError(f"{ns.model} has no tokenizer files; chat needs one")
    if ns.adapter is not None:
        model.load_adapter(ns.adapter)
    print(f"loaded {ns.model.name} ({model.config.num_layers} layers, "
          f"{model.config.hidden_size} hidden) in {time.perf_counter() - start:.1f}s",
          flush=True)
    options: dict[str, Any] = dict(max_new_tokens=ns.max_new_tokens, seed=ns.seed)
    if ns.do_sample:
        options["do_sample"] = True
    for name in SAMPLING_FLAGS:
        value = getattr(ns, name)
        if value is not None:
            options[name] = None if name == "top_k" and value == 0 else value
    return ChatSession(model, tokenizer, system=ns.system, merge_adapters=ns.merge_adapters,
                       options=options)


def run(ns: argparse.Namespace, stdin: TextIO = sys.stdin) -> None:
    """`fastlora-jax chat`: one answer with --prompt, else a conversation on stdin."""
    session = _load(ns)

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    if ns.prompt is not None:
        print(f"user: {ns.prompt}\nassistant: ", end="", flush=True)
        start = time.perf_counter()
        _, n = session.reply(ns.prompt, show)
        seconds = time.perf_counter() - start
        print(f"\n({n} tokens in {seconds:.1f}s)", flush=True)
        return
    print("type a message; /reset starts over, /exit quits", flush=True)
    while True:
        print("user: ", end="", flush=True)
        line = stdin.readline()
        if not line:
            print(flush=True)
            return
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return
        if message == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        print("assistant: ", end="", flush=True)
        try:
            session.reply(message, show)
        except GenerationError as err:
            print(f"\n(error: {err}; /reset to start over)", flush=True)
            continue
        print(flush=True)
