"""From a dataset to fixed-shape training rows: tokenize, template, mask, truncate, pack.

Sources: a local .json / .jsonl / .parquet / .csv file (read with `datasets`) or a
`datasets.Dataset`. Each example becomes token ids plus a per-token "train on this" mask:
- `dataset_text_field` (default "text") or `formatting_func(example) -> str`: plain text, EOS
  appended, every token trained;
- a `messages` column (chat): rendered with the tokenizer's chat template; with
  `train_on_responses_only` only assistant turns carry labels (each turn's tokens are found by
  rendering the conversation up to it).
Sequences longer than `max_seq_length` are truncated (counted). Rows are then either one example
each (padded) or packed: examples laid end to end with `segment_ids` 1, 2, … and positions that
restart at 0, so that no token attends across examples (segment 0 is padding).
A row holds `input_ids`, `targets` (next token where it is trained and belongs to the same
example, else -100), `positions`, `segment_ids`, all int32 [max_seq_length].
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from fastlora_jax.errors import DataError
from fastlora_jax.train.loss import IGNORE

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass
class DataStats:
    """What the pipeline did, for the run's log."""

    examples: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    rows: int = 0
    tokens: int = 0
    label_tokens: int = 0


def load_dataset_source(data: Any, *, name: str = "train_dataset") -> Any:
    """A `datasets.Dataset` from a Dataset or a local file path (clear errors otherwise); `name`
    is the argument errors mention."""
    import datasets

    if isinstance(data, datasets.Dataset):
        dataset = data
    elif isinstance(data, (str, pathlib.Path)):
        path = pathlib.Path(data)
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist; pass a .json, .jsonl, "
                            f".parquet or .csv file or a datasets.Dataset")
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"data file {str(path)!r} has suffix {path.suffix!r}; expected one of "
                            f"{sorted(FILE_FORMATS)}")
        if path.stat().st_size == 0:
            raise DataError(f"data file {str(path)!r} is empty")
        if fmt == "json":
            check_json_rows(path)
        try:
            dataset = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for unreadable files
            raise DataError(f"data file {str(path)!r} could not be read as {fmt}: {err}") from None
    else:
        raise DataError(f"{name} must be a datasets.Dataset or a file path, found "
                        f"{type(data).__name__}")
    if len(dataset) == 0:
        raise DataError(f"{name} ({data!s}) has no examples")
    return dataset


def check_json_rows(path: pathlib.Path) -> None:
    """A .json / .jsonl data file holds one JSON object per example: a JSON array of objects, or
    JSON Lines of objects. Checked here, before `datasets` reads it, because its JSON reader
    (pyarrow) crashes the process on lines that are not objects (e.g. `null`)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            rows = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"data file {str(path)!r} is not valid JSON ({err})") from None
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"data file {str(path)!r}: entry {bad} of the JSON array is "
                            f"{type(rows[bad]).__name__}, expected an object (one example)")
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"data file {str(path)!r}, line {number}: not valid JSON ({err}); "
                                f"a .json/.jsonl file holds one JSON object per line (JSON Lines) "
                                f"or one JSON array of objects") from None
            if not isinstance(row, dict):
                raise DataError(f"data file {str(path)!r}, line {number}: found "
                                f"{type(row).__name__}, expected a JSON object (one example)")


def _assistant_mask(tokenizer: Any, messages: list[dict[str, str]], where: str
                    ) -> tuple[list[int], list[bool]]:
    """Token ids of the templated conversation and True on assistant-turn tokens."""
    ids = _render(tokenizer, messages, where, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], where, add_generation_prompt=True)) if i else 0
        end_ids = _render(tokenizer, messages[:i + 1], where, add_generation_prompt=False)
        if end_ids != ids[:len(end_ids)]:
            raise DataError("the tokenizer's chat template does not render a conversation's "
                            "prefix as a prefix of the whole; train_on_responses_only cannot "
                            "locate assistant turns with this template")
        for j in range(start, len(end_ids)):
            mask[j] = True
    return ids, mask


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, *,
            add_generation_prompt: bool) -> list[int]:
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:  # templates raise on turns they do not accept
        raise DataError(f"{where}: the tokenizer's chat template refused the conversation "
                        f"({err}); fix the 'messages' of this example") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat example's turns: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} "
                        f"turns, found {_short(messages)}")
    for turn in messages:
        if (not isinstance(turn, dict) or not isinstance(turn.get("role"), str)
                or not isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: every turn of 'messages' must be {{'role': str, "
                            f"'content': str}}, found {_short(turn)}")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def tokenize_examples(dataset: Any, tokenizer: Any, *, dataset_text_field: str = "text",
                      formatting_func: Callable[[dict[str, Any]], str] | None = None,
                      train_on_responses_only: bool = False, name: str = "the dataset",
                      ) -> list[tuple[list[int], list[bool]]]:
    """(token ids, train mask) for every example; `name` is how errors call the dataset."""
    columns = list(dataset.column_names)
    chat = formatting_func is None and "messages" in columns and dataset_text_field not in columns
    if formatting_func is None and not chat and dataset_text_field not in columns:
        raise DataError(f"{name} has no {dataset_text_field!r} column (columns: {columns}); "
                        f"set dataset_text_field, pass formatting_func, or provide a 'messages' "
                        f"column for chat data")
    if train_on_responses_only and not chat:
        raise DataError("train_on_responses_only needs chat data (a 'messages' column of "
                        "{'role', 'content'} turns)")
    if chat and tokenizer.chat_template is None:
        raise DataError(f"{name} holds chat data (a 'messages' column) but the tokenizer "
                        f"({tokenizer.name_or_path or type(tokenizer).__name__}) has no chat "
                        f"template; use a model folder whose tokenizer has one "
                        f"(tokenizer_config.json 'chat_template' or chat_template.jinja), or "
                        f"give text rows (dataset_text_field) or a formatting_func")
    eos = tokenizer.eos_token_id
    out = []
    for index, example in enumerate(dataset):
        where = f"{name}, example {index}"
        if chat:
            messages = _check_messages(example["messages"], where)
            ids, mask = _assistant_mask(tokenizer, messages, where) if train_on_responses_only \
                else (_render(tokenizer, messages, where, add_generation_prompt=False), None)
            mask = mask if mask is not None else [True] * len(ids)
        else:
            text = formatting_func(example) if formatting_func else example[dataset_text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: expected text (str) from "
                                f"{'formatting_func' if formatting_func else dataset_text_field!r}, "
                                f"found {type(text).__name__}")
            ids = list(tokenizer(text)["input_ids"])
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            mask = [True] * len(ids)
        out.append((ids, mask))
    return out


def build_rows(examples: Sequence[tuple[list[int], list[bool]]], *, max_seq_length: int,
               packing: bool, pad_token_id: int = 0, name: str = "the dataset"
               ) -> tuple[dict[str, np.ndarray], DataStats]:
    """Fixed-shape rows [N, max_seq_length] (see module doc) and the pipeline's statistics."""
    stats = DataStats(examples=len(examples))
    seqs = []
    for ids, mask in examples:
        if len(ids) > max_seq_length:
            stats.truncated += 1
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        # a token is a target when the token it predicts is trained
        targets = [ids[i + 1] if mask[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
        if all(t == IGNORE for t in targets):
            stats.dropped_no_labels += 1
            continue
        seqs.append((ids, targets))
    if not seqs:
        raise DataError(f"every label is masked: none of the {len(examples)} examples of {name} "
                        f"has a trained token after templating and truncation to "
                        f"max_seq_length={max_seq_length} (assistant turns cut off?)")
    rows: list[list[tuple[list[int], list[int]]]] = []
    for seq in seqs:
        if packing and rows and sum(len(s[0]) for s in rows[-1]) + len(seq[0]) <= max_seq_length:
            rows[-1].append(seq)
        else:
            rows.append([seq])
    n = len(rows)
    out = {"input_ids": np.full((n, max_seq_length), pad_token_id, np.int32),
           "targets": np.full((n, max_seq_length), IGNORE, np.int32),
           "positions": np.zeros((n, max_seq_length), np.int32),
           "segment_ids": np.zeros((n, max_seq_length), np.int32)}
    for r, row in enumerate(rows):
        at = 0
        for seg, (ids, targets) in enumerate(row, start=1):
            k = len(ids)
            out["input_ids"][r, at:at + k] = ids
            out["targets"][r, at:at + k] = targets
            out["positions"][r, at:at + k] = np.arange(k)
            out["segment_ids"][r, at:at + k] = seg
            at += k
    stats.rows = n
    stats.tokens = int((out["segment_ids"] > 0).sum())
    stats.label_tokens = int((out["targets"] != IGNORE).sum())
    return out, stats


def epoch_order(num_rows: int, epoch: int, seed: int) -> np.ndarray:
    """The row order of an epoch (a permutation fixed by seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_at(rows: dict[str, np.ndarray], step: int, *, rows_per_step: int, accumulation: int,
             seed: int) -> tuple[dict[str, np.ndarray], int]:
    """The [accumulation, batch, T] batch of optimizer step `step` (0-based) and its epoch.

    Epochs are walked in order; a step that would straddle two epochs starts the next epoch
    (the remainder rows of an epoch are skipped), so a step's batch depends only on `step`.
    """
    n = len(rows["input_ids"])
    if rows_per_step > n:
        raise DataError(f"one optimizer step needs {rows_per_step} rows "
                        f"(per_device_train_batch_size x gradient_accumulation_steps) but the "
                        f"dataset gives only {n}; lower the batch size or add data")
    per_epoch = n // rows_per_step
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(n, epoch, seed)[within * rows_per_step:(within + 1) * rows_per_step]
    batch = {k: v[order].reshape((accumulation, rows_per_step // accumulation) + v.shape[1:])
             for k, v in rows.items()}
    return batch, epoch
