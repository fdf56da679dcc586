"""A Hugging Face tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Two kinds, told apart by the fast tokenizer's model (its tokenizer.json):

- byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen, ...) -> `tokenizer.ggml.model = "gpt2"`
  with the merges and `tokenizer.ggml.pre`, the name of llama.cpp's pre-tokenizer (its regex
  split). llama.cpp identifies pre-tokenizers by the token ids a fixed probe text encodes to
  (`PRE_TOKENIZER_PROBE`); the hashes of the families we support are in `PRE_TOKENIZERS`.
- SentencePiece-style (BPE with byte fallback, or Unigram: Llama 2, Mistral, Gemma, Phi-3) ->
  `tokenizer.ggml.model = "llama"` with per-token scores. llama.cpp merges the adjacent pair whose
  merged token scores highest; for a BPE model we give each token minus the rank of the first
  merge that produces it, which orders merges exactly as the tokenizer's merge list does
  (SentencePiece's own scores follow the same order). Unigram scores are copied.

Token types follow llama.cpp's converter: special added tokens (and ones that look special, like
`<|...|>`) are CONTROL, other added tokens USER_DEFINED, `<0xNN>` BYTE, the unknown token UNKNOWN.
Rows of the embedding beyond the tokenizer's vocabulary become `[PADi]` UNUSED tokens. Whether a
BOS / EOS is added is read off the tokenizer itself (encode with and without special tokens).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import gguf

from fastlora_jax.errors import ExportError

# The probe text llama.cpp's converter encodes to identify a BPE pre-tokenizer.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL")
# sha256 of str(token ids of the probe) -> llama.cpp pre-tokenizer name.
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1/2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5-2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4
}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL),
    int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED), int(gguf.TokenType.BYTE))
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE_MARK = "\u2581"  # SentencePiece's visible space
SPACE_BYTE = "\u0120"  # byte-level BPE's spelling of a space


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control even when not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; "
                          f"GGUF export reads the tokenizer.json model of a fast tokenizer "
                          f"(load it with AutoTokenizer.from_pretrained(..., use_fast=True))")
    return json.loads(backend.to_str())


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer."""
    ids = tokenizer.encode(PRE_TOKENIZER_PROBE)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ExportError(f"llama.cpp does not know this tokenizer's pre-tokenizer (probe hash "
                          f"{digest}); known: {sorted(set(PRE_TOKENIZERS.values()))}. Exporting "
                          f"it would tokenize differently in llama.cpp")
    return PRE_TOKENIZERS[digest]


def _special_adds(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when the tokenizer encodes a text with special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and (
        full[0] == tokenizer.bos_token_id and full[1:len(plain) + 1] == plain)
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and (
        full[-1] == tokenizer.eos_token_id and full[-len(plain) - 1:-1] == plain)
    return bool(bos), bool(eos)


def _space_prefix(tj: dict[str, Any]) -> bool:
    """Whether SentencePiece-style normalisation prepends a space to the text."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == SPACE_MARK:
                return True
            if node.get("type") == "Metaspace" and (
                    node.get("prepend_scheme") in ("always", "first")
                    or node.get("add_prefix_space") is True):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(tj.get("normalizer")) or walk(tj.get("pre_tokenizer"))


def _base_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], dict[int, Any]]:
    """(tokens, types, added-token records by id) for `vocab_size` rows, padding included."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(vocab.values())} but the model's "
                          f"embedding has only vocab_size={vocab_size} rows; export with the "
                          f"model's own tokenizer")
    by_id = {i: t for t, i in vocab.items()}
    added = dict(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if i in added:
            record = added[i]
            if not record.normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if record.special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace(SPACE_MARK, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types, added


def _spm_scores(tj: dict[str, Any], tokens: list[str], types: list[int]) -> list[float]:
    model = tj["model"]
    if model["type"] == "Unigram":
        scores = [-1000.0] * len(tokens)
        for i, (_, score) in enumerate(model["vocab"]):
            if i < len(scores) and types[i] == NORMAL:
                scores[i] = float(score)
        return scores
    rank: dict[str, int] = {}
    for k, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, k)
    fallback = len(rank)
    scores = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL:
            scores.append(-float(rank.get(token, fallback + i)))
        else:
            scores.append(0.0 if kind == BYTE else -1000.0)
    return scores


def _merges(tj: dict[str, Any]) -> list[str]:
    """The merges in llama.cpp's spelling: "a b", a space inside a token written as U+0120 (the
    `gguf` package's conversion of the list form `[a, b]`; the string form is already spelled so).
    """
    merges = (tj.get("model") or {}).get("merges") or []
    if not merges:
        raise ExportError("the BPE tokenizer has no merges; llama.cpp cannot run it")
    if isinstance(merges[0], str):
        return list(merges)
    return [f"{a.replace(' ', SPACE_BYTE)} {b.replace(' ', SPACE_BYTE)}" for a, b in merges]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write `tokenizer` (an HF fast tokenizer) into `writer`'s metadata."""
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    tokens, types, _ = _base_tokens(tokenizer, vocab_size)
    spm = model.get("type") == "Unigram" or (model.get("type") == "BPE" and
                                              model.get("byte_fallback", False))
    if model.get("type") not in ("BPE", "Unigram"):
        raise ExportError(f"tokenizer model {model.get('type')!r} has no GGUF form; "
                          f"supported: byte-level BPE, SentencePiece BPE / Unigram")
    if spm:
        unk = tokenizer.unk_token_id
        types = [BYTE if kind == NORMAL and _BYTE_TOKEN.fullmatch(tok) else
                 UNKNOWN if i == unk else kind for i, (tok, kind) in enumerate(zip(tokens, types))]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tj, tokens, types))
        writer.add_token_types(types)
        writer.add_add_space_prefix(_space_prefix(tj))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(tj))
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None and token_id < vocab_size:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    add_bos, add_eos = _special_adds(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


__all__ = ["PRE_TOKENIZERS", "PRE_TOKENIZER_PROBE", "add_tokenizer", "pre_tokenizer"]
