"""Preference data for DPO, on TRL's formats and tokenization rules.

Rows hold `prompt`, `chosen`, `rejected`: plain strings, or lists of chat messages (the prompt's
messages, then one assistant turn each). Without a `prompt` column the prompt is the longest
common prefix of the chosen and rejected conversations (TRL's implicit prompt). Plain completions
get the EOS token appended. The completion starts where the tokenized prompt and
prompt + completion first differ. `max_prompt_length` keeps a prompt's last tokens;
`max_length` truncates prompt + completion (keep_start: its start, dropping examples whose prompt
alone fills it; keep_end: its end).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fastlora_jax.errors import DataError


@dataclasses.dataclass
class PreferenceRows:
    """Padded arrays [N, 2, S] (chosen, rejected) and the number of examples dropped."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    completion_mask: np.ndarray
    dropped: int


def _conversational(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer: Any, row: dict[str, Any], index: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of one row."""
    missing = [k for k in ("chosen", "rejected") if row.get(k) in (None, "", [])]
    if missing:
        raise DataError(f"preference row {index} has no {' / '.join(missing)}; every row needs "
                        f"'chosen' and 'rejected' (and 'prompt', or conversations that share "
                        f"it); found keys {sorted(k for k, v in row.items() if v is not None)}")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    if _conversational(chosen):
        if prompt is None:
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
        render = lambda msgs, gen: tokenizer(tokenizer.apply_chat_template(  # noqa: E731
            msgs, tokenize=False, add_generation_prompt=gen), add_special_tokens=False)["input_ids"]
        prompt_ids = render(prompt, True)
        full_c, full_r = render(prompt + chosen, False), render(prompt + rejected, False)
    else:
        if prompt is None:
            raise DataError(f"preference row {index} has plain-text chosen/rejected but no "
                            f"'prompt'")
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_c = tokenizer(prompt + chosen)["input_ids"]
        full_r = tokenizer(prompt + rejected)["input_ids"]
    cut = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    return list(full_c[:cut]), list(full_c[cut:]), list(full_r[cut:])


def build_preference_rows(dataset: Any, tokenizer: Any, *, max_length: int | None,
                          max_prompt_length: int | None, truncation_mode: str,
                          pad_token_id: int) -> PreferenceRows:
    """Tokenize, truncate and pad every pair to one width S (the longest kept sequence)."""
    pairs, dropped = [], 0
    for index, row in enumerate(dataset):
        prompt, chosen, rejected = tokenize_pair(tokenizer, row, index)
        if max_prompt_length:
            prompt = prompt[-max_prompt_length:]
        if max_length and truncation_mode == "keep_start" and len(prompt) >= max_length:
            dropped += 1
            continue
        seqs = []
        for completion in (chosen, rejected):
            ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
            if max_length and len(ids) > max_length:
                sl = slice(None, max_length) if truncation_mode == "keep_start" \
                    else slice(-max_length, None)
                ids, mask = ids[sl], mask[sl]
            seqs.append((ids, mask))
        pairs.append(seqs)
    if not pairs:
        raise DataError(f"no preference pair is left after truncation ({dropped} dropped: their "
                        f"prompt fills max_length={max_length})")
    width = max(len(ids) for seqs in pairs for ids, _ in seqs)
    shape = (len(pairs), 2, width)
    ids = np.full(shape, pad_token_id, np.int32)
    attention, completion = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for i, seqs in enumerate(pairs):
        for j, (seq, mask) in enumerate(seqs):
            ids[i, j, :len(seq)] = seq
            attention[i, j, :len(seq)] = 1
            completion[i, j, :len(seq)] = mask
    return PreferenceRows(ids, attention, completion, dropped)
