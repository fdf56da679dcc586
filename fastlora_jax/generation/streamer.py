"""`TextStreamer`: decoded text pieces of a completion while it is generated.

It speaks transformers' streamer protocol (`put(token_ids)`, `end()`; the first `put` is the
prompt), so `model.generate(..., streamer=TextStreamer(tokenizer, callback=print_piece))`
works, and so do transformers' own streamers. Pieces go to `callback` when one is given; otherwise iterating the
streamer yields them (from another thread than the generation, as with transformers'
TextIteratorStreamer; `Generator.stream` does that for you).
"""

from __future__ import annotations

import queue
from typing import Any, Callable, Iterator

import numpy as np

_END = object()


class TextStreamer:
    """Incremental detokenization: after each token, decode the completion so far and emit the
    text that was not emitted yet, holding back while the text ends in an incomplete character
    (U+FFFD) or while the decoded text no longer starts with what was emitted (a tokenizer that
    rewrites earlier text). The pieces concatenate to the decoded completion."""

    def __init__(self, tokenizer: Any, *, callback: Callable[[str], Any] | None = None,
                 skip_prompt: bool = True, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.callback = callback
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = ""
        self._seen_prompt = False
        self._queue: queue.Queue[Any] = queue.Queue()

    def _emit(self, piece: str) -> None:
        if not piece:
            return
        if self.callback is not None:
            self.callback(piece)
        else:
            self._queue.put(piece)

    def put(self, token_ids: Any) -> None:
        ids = np.asarray(token_ids).reshape(-1).tolist()
        if self.skip_prompt and not self._seen_prompt:
            self._seen_prompt = True
            return
        self._ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return
        piece, self._emitted = text[len(self._emitted):], text
        self._emit(piece)

    def end(self) -> None:
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.startswith(self._emitted):
            self._emit(text[len(self._emitted):])
        self._emitted = text
        self._ids = []
        self._seen_prompt = False
        self._queue.put(_END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item
