"""Streaming and the chat command on a tiny random model with SmolLM2's tokenizer and template."""

from __future__ import annotations

import argparse
import io

import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.chat import ChatSession, add_arguments, run
from fastlora_jax.generation import Generator, TextStreamer
from tests.checkpoints import tiny_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm2_dir):
    folder = tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), smollm2_dir)
    model, tokenizer = FastLanguageModel.from_pretrained(folder, dtype="float32",
                                                         max_seq_length=256)
    return folder, model, tokenizer


def test_streamer_pieces_concatenate_to_the_completion(chat_model):
    _, model, tokenizer = chat_model
    ids = tokenizer("The weather today is")["input_ids"]
    pieces: list[str] = []
    out = model.generate(ids, max_new_tokens=24, eos_token_id=[], tokenizer=tokenizer,
                         streamer=TextStreamer(tokenizer, callback=pieces.append))
    assert len(out.tokens[0]) == 24 and len(pieces) > 3
    assert "".join(pieces) == out.texts[0]
    again = model.generate(ids, max_new_tokens=24, eos_token_id=[], tokenizer=tokenizer)
    assert again.tokens == out.tokens            # streaming decodes the same tokens
    gen = Generator(model, tokenizer=tokenizer)
    assert "".join(gen.stream(ids, max_new_tokens=24, eos_token_id=[])) == out.texts[0]


def test_chat_session_keeps_the_conversation(chat_model):
    _, model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, system="Be brief.",
                          options=dict(max_new_tokens=8, eos_token_id=[]))
    first, n = session.reply("Hello there")
    assert n == 8 and session.messages[-1] == {"role": "assistant", "content": first}
    second, _ = session.reply("And then?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user",
                                                     "assistant"]
    text = tokenizer.decode(session.prompt_ids())
    assert "Hello there" in text and "And then?" in text and first in text
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_command_interactive_and_one_shot(chat_model, capsys):
    folder, _, _ = chat_model
    parser = argparse.ArgumentParser()
    add_arguments(parser, folder)
    ns = parser.parse_args(["--model", str(folder), "--max_new_tokens", "6",
                            "--max_seq_length", "256"])
    run(ns, stdin=io.StringIO("hi\n\n/reset\nagain\n/exit\nnever read\n"))
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2 and "(conversation cleared)" in out
    ns = parser.parse_args(["--model", str(folder), "--prompt", "one shot",
                            "--max_new_tokens", "6", "--max_seq_length", "256"])
    run(ns)
    out = capsys.readouterr().out
    assert "user: one shot\nassistant: " in out and "tokens in" in out
