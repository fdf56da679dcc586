"""Write small HF-style checkpoints with numpy + safetensors (no torch), for loader tests."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from safetensors.numpy import save_file

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 40,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "hidden_act": "silu", "architectures": ["LlamaForCausalLM"],
    "torch_dtype": "float32",
}


def llama_tensors(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors with HF names for a llama `config` dict."""
    rng = np.random.default_rng(seed)
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim", H // nh)
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(size=(V, H)),
                                "model.norm.weight": 1 + 0.1 * rng.normal(size=(H,))}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(H,))
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(H,))
        t[p + "self_attn.q_proj.weight"] = rng.normal(size=(nh * hd, H)) / np.sqrt(H)
        t[p + "self_attn.k_proj.weight"] = rng.normal(size=(nkv * hd, H)) / np.sqrt(H)
        t[p + "self_attn.v_proj.weight"] = rng.normal(size=(nkv * hd, H)) / np.sqrt(H)
        t[p + "self_attn.o_proj.weight"] = rng.normal(size=(H, nh * hd)) / np.sqrt(nh * hd)
        t[p + "mlp.gate_proj.weight"] = rng.normal(size=(I, H)) / np.sqrt(H)
        t[p + "mlp.up_proj.weight"] = rng.normal(size=(I, H)) / np.sqrt(H)
        t[p + "mlp.down_proj.weight"] = rng.normal(size=(H, I)) / np.sqrt(I)
    if not config.get("tie_word_embeddings", False):
        t["lm_head.weight"] = rng.normal(size=(V, H)) / np.sqrt(H)
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_checkpoint(folder: pathlib.Path, config: dict[str, Any],
                     tensors: dict[str, np.ndarray], *, shards: int = 1) -> pathlib.Path:
    """config.json + model.safetensors (or `shards` files with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
         "weight_map": weight_map}))
    return folder


def tiny_chat_model(folder: pathlib.Path, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template (fast training)."""
    import shutil

    config = dict(TINY_LLAMA, vocab_size=49152, hidden_size=32, intermediate_size=64,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    tensors = llama_tensors(config, seed=7)
    tensors["model.embed_tokens.weight"] *= 0.05
    write_checkpoint(folder, config, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
                      "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant "
                      "{% endif %}")


def tiny_tokenizer(folder: pathlib.Path, vocab_size: int = TINY_LLAMA["vocab_size"]) -> pathlib.Path:
    """A word-level tokenizer of `vocab_size` entries (special tokens, a few words, then
    w0, w1, ...) with a chat template, saved by transformers: quick to load, for fuzz tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = special + ["system", "user", "assistant", "the", "cat", "sat", "hello", "world", "."]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": special[2:]})
    tok.chat_template = TINY_CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return folder
