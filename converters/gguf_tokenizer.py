"""The transformers tokenizer a GGUF file describes, built without torch.

A GGUF carries no tokenizer.json: the vocabulary, merges, scores, token types, special token ids
and chat template are metadata under llama.cpp's key names. transformers' converter for them
(`transformers.integrations.gguf.convert_gguf_tokenizer`: byte-level BPE, SentencePiece, Gemma's
and Phi-3's variants, pre-tokenizer regexes) is torch-free, but the function that reads the file
for it goes through transformers' torch GGUF reader; so the metadata is read here with the `gguf`
package, grouped under transformers' own key table, and handed to that converter. The result is
the tokenizer `AutoTokenizer.from_pretrained(folder, gguf_file=...)` builds (same tokenizer.json,
same special tokens and chat template), as a `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

from typing import Any

from fastlora_jax.converters.gguf_read import GGUFFile
from fastlora_jax.errors import CheckpointError

# transformers' names for the special tokens, and the GGUF id key of each
SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                  "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def gguf_tokenizer(g: GGUFFile) -> Any:
    """The tokenizer of `g`, or a CheckpointError when the file has none or it cannot be built."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError as err:
        raise CheckpointError(f"{str(g.path)!r}: building its tokenizer needs transformers' GGUF "
                              f"tokenizer converter (transformers.integrations.gguf), which this "
                              f"transformers lacks ({err}); upgrade transformers (5.24 and 5.25 "
                              f"are known to work)") from None
    if "tokenizer.ggml.tokens" not in g.reader.fields:
        raise CheckpointError(f"{str(g.path)!r} has no tokenizer (no 'tokenizer.ggml.tokens' "
                              f"metadata); re-export it with its tokenizer")
    groups = {group: {name: g.value(f"tokenizer.{key}") for key, name in renames.items()
                      if f"tokenizer.{key}" in g.reader.fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocab, init = groups["tokenizer"], groups["tokenizer_config"]
    if vocab.get("tokenizer_type") == "llama":
        init.setdefault("add_bos_token", True)  # llama.cpp's default for SentencePiece files
    for name, key in SPECIAL_TOKENS.items():
        token_id = g.value(f"tokenizer.ggml.{key}", None)
        init[name] = vocab["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(g.arch, vocab)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{str(g.path)!r}: its tokenizer "
                              f"({vocab.get('tokenizer_type')!r}, pre-tokenizer "
                              f"{vocab.get('pre_tokenizer_type')!r}) cannot be built: {err}"
                              ) from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **init, **extra)
