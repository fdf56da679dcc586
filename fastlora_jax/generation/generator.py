"""`model.generate(...)`: prompts in, completions out, on the engine's two compiled calls.

The host side of generation: read the prompts (token ids, ragged lists, strings), check every
argument (one `GenerationError` naming it), left-pad to a bucketed length, run `engine.prefill`
and `engine.decode`, hand tokens to a streamer, and return a `GenerateOutput`. Prompt length,
cache length and batch are rounded up to powers of two (`bucket`) so that a chat session or an
evaluation loop compiles once per bucket, not per call.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import GenerationError
from fastlora_jax.generation import engine
from fastlora_jax.generation.config import GenerationConfig
from fastlora_jax.generation.sampling import SamplingConfig
from fastlora_jax.generation.streamer import TextStreamer
from fastlora_jax.models.decoder import Params, unstack_layers
from fastlora_jax.ops.impl import platform

if TYPE_CHECKING:
    from fastlora_jax.models.causal_lm import CausalLM

MIN_PROMPT_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns; rows are prompt-major (prompt i, sequence j -> i * n + j).

    sequences: int32 [N, T] generated tokens (T = the longest row), pad_token_id after a row's
      end; completion_mask: bool [N, T], True for each generated token through the row's EOS;
    logprobs: float32 [N, T] log p(token) under the model (log-softmax of its logits, before
      any processor), 0 where masked, or None unless asked for (`output_logprobs=True`);
    prompts: each row's prompt ids; texts: decoded completions (special tokens skipped) when a
      tokenizer was given.
    """

    sequences: np.ndarray
    completion_mask: np.ndarray
    logprobs: np.ndarray | None
    prompts: list[list[int]]
    texts: list[str] | None = None

    @property
    def tokens(self) -> list[list[int]]:
        """Each row's generated ids through its EOS (no padding)."""
        return [row[mask].tolist() for row, mask in zip(self.sequences, self.completion_mask)]


def _is_int_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x)


def read_prompts(prompts: Any, *, tokenizer: Any = None,
                 attention_mask: Any = None) -> list[list[int]]:
    """Token id lists from ids [B, T] (with an optional 0/1 attention_mask, left or right
    padded), a 1-D id sequence, a list of id lists, a string or a list of strings."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(p, str) for p in prompts)):
        if tokenizer is None:
            raise GenerationError("prompts are strings but no tokenizer was given; pass "
                                  "tokenizer=... (from FastLanguageModel.from_pretrained) or "
                                  "token ids")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [list(tokenizer(t)["input_ids"]) for t in texts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        ids = np.asarray(prompts)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise GenerationError(f"input_ids must be integer [batch, seq] (or [seq]); got "
                                  f"dtype {ids.dtype} shape {ids.shape}")
        if attention_mask is None:
            return [row.tolist() for row in ids]
        mask = np.asarray(attention_mask).reshape(ids.shape).astype(bool)
        return [row[m].tolist() for row, m in zip(ids, mask)]
    if attention_mask is not None:
        raise GenerationError("attention_mask goes with input_ids as an array [batch, seq]; "
                              "token id lists need none")
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise GenerationError("prompts is an empty batch; give at least one prompt")
    if _is_int_sequence(prompts):
        return [[int(t) for t in prompts]]
    if isinstance(prompts, (list, tuple)) and all(_is_int_sequence(p) for p in prompts):
        return [[int(t) for t in p] for p in prompts]
    raise GenerationError(f"prompts must be input_ids [batch, seq], a list of token ids, a list "
                          f"of token id lists, a string or a list of strings; got "
                          f"{type(prompts).__name__}")


def per_layer_weights() -> bool:
    """Whether generation reads the frozen weights from one buffer per layer (the CPU), rather
    than scanning the model's stacked arrays (elsewhere).

    XLA's CPU dot reads its operands whole, so a layer scanned out of the stacked weights is
    copied before every use: at batch 1 that copy costs more than the product itself
    (benchmarks/generate.py --stacked times both). The per-layer copy is made once per
    `Generator`, or once for all calls by `FastLanguageModel.for_inference`.
    """
    return platform() == "cpu"


@dataclasses.dataclass(frozen=True)
class _Prepared:
    source: tuple[int, ...]    # identities of the arrays it was made from
    merged: bool
    frozen: Params


# Frozen trees made by `prepare` (for_inference), reused while the model holds the same arrays.
_PREPARED: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()


def _identity(*trees: Any) -> tuple[int, ...]:
    return tuple(id(leaf) for tree in trees for leaf in jax.tree.leaves(tree))


def _generation_frozen(model: CausalLM, merged: bool, per_layer: bool) -> Params:
    frozen = model.merged_params() if merged else model.params()
    return unstack_layers(frozen, model.config.num_layers) if per_layer else frozen


def prepare(model: CausalLM, *, merge_adapters: bool) -> None:
    """Make the frozen tree generation reads (adapters folded in if asked; one buffer per
    layer on the CPU) once and keep it for every later call on this model."""
    merged = merge_adapters and model.lora is not None
    source = _identity(model.params(), model.lora_params() if merged else None)
    _PREPARED[model] = _Prepared(source, merged,
                                 _generation_frozen(model, merged, per_layer_weights()))


def release(model: CausalLM) -> None:
    """Drop what `prepare` kept for `model`."""
    _PREPARED.pop(model, None)


class Generator:
    """Generation on one model's weights, prepared once (`model.generate` makes one per call;
    the chat command keeps one for the session).

    Adapters apply unmerged by default (no copy of the weights; the model can keep training);
    merge_adapters=True folds them into a dense copy (quantized weights are dequantized);
    disable_adapters=True generates with the base model. per_layer: the weight layout
    (default `per_layer_weights()`).
    """

    def __init__(self, model: CausalLM, *, tokenizer: Any = None,
                 merge_adapters: bool | None = None, disable_adapters: bool = False,
                 per_layer: bool | None = None) -> None:
        self.config = model.config
        self.defaults: GenerationConfig = model.generation_config
        self.max_seq_length = model.max_seq_length
        self.tokenizer = tokenizer
        merge = self.defaults.merge_adapters if merge_adapters is None else merge_adapters
        adapted = model.lora is not None and not disable_adapters
        merged = adapted and merge
        per_layer = per_layer_weights() if per_layer is None else per_layer
        self.lora = model.lora_params() if adapted and not merged else None
        self.lora_spec = model.lora_spec if self.lora is not None else None
        kept = _PREPARED.get(model)
        source = _identity(model.params(), model.lora_params() if merged else None)
        if (kept is not None and kept.source == source and kept.merged == merged
                and per_layer == per_layer_weights()):
            self.frozen = kept.frozen
        else:
            self.frozen = _generation_frozen(model, merged, per_layer)

    # -- checks ---------------------------------------------------------------------------
    def _eos(self, eos_token_id: int | Sequence[int]) -> tuple[int, ...]:
        ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else eos_token_id
        try:
            ids = tuple(int(i) for i in ids)
        except (TypeError, ValueError):
            raise GenerationError(f"eos_token_id={eos_token_id!r} must be a token id or a list "
                                  f"of them") from None
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise GenerationError(f"eos_token_id={eos_token_id!r}: {bad} not token ids of this "
                                  f"model (vocab_size={self.config.vocab_size})")
        return ids

    def _check_prompts(self, rows: list[list[int]], max_new_tokens: int) -> None:
        if not rows:
            raise GenerationError("prompts is an empty batch; give at least one prompt")
        for i, row in enumerate(rows):
            if not row:
                raise GenerationError(f"prompt {i} is empty; every prompt needs at least one "
                                      f"token (e.g. the BOS token)")
            bad = [t for t in row if not 0 <= t < self.config.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} holds token ids {bad[:5]} outside the "
                                      f"model's vocabulary [0, {self.config.vocab_size})")
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > self.max_seq_length:
            raise GenerationError(
                f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} "
                f"exceeds the cache: max_seq_length={self.max_seq_length}; shorten the prompt, "
                f"lower max_new_tokens, or load with a larger max_seq_length")

    # -- generation -----------------------------------------------------------------------
    def spec_and_inputs(self, rows: list[list[int]], sampling: SamplingConfig,
                        max_new_tokens: int, eos: tuple[int, ...], pad: int,
                        logprobs: bool) -> tuple[engine.EngineSpec, dict[str, Any]]:
        """The static spec and the device inputs of `engine.prefill` for these prompt rows."""
        longest = max(len(r) for r in rows)
        p = bucket(longest, MIN_PROMPT_BUCKET)
        cache_len = bucket(p + max_new_tokens)
        if cache_len > self.max_seq_length:   # exact sizes beat the bucket at the limit
            p, cache_len = longest, longest + max_new_tokens
        b = bucket(len(rows))
        prompt = np.full((b, p), pad, np.int32)
        start = np.full((b,), p - 1, np.int32)      # padding rows: one pad token, done at once
        for i, row in enumerate(rows):
            prompt[i, p - len(row):] = row
            start[i] = p - len(row)
        done = np.arange(b) >= len(rows)
        spec = engine.EngineSpec(config=self.config, lora_spec=self.lora_spec, sampling=sampling,
                                 cache_len=cache_len, eos_ids=eos, pad_id=pad, logprobs=logprobs)
        inputs = dict(prompt=jnp.asarray(prompt), start=jnp.asarray(start),
                      max_new=jnp.asarray(max_new_tokens, jnp.int32),
                      row_ids=jnp.arange(b, dtype=jnp.int32), done=jnp.asarray(done))
        return spec, inputs

    def __call__(self, prompts: Any, *, num_return_sequences: int = 1,
                 seed: int | None = None, output_logprobs: bool = False, streamer: Any = None,
                 attention_mask: Any = None, **options: Any) -> GenerateOutput:
        """Generate (see `CausalLM.generate`). `options` are GenerationConfig fields
        (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
        eos_token_id, pad_token_id); those not given come from the model's generation_config.
        eos_token_id may be one id or several (None: the model's)."""
        known = {f.name for f in dataclasses.fields(GenerationConfig)} - {"merge_adapters"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationError(f"unknown generation option(s) {unknown}; known: "
                                  f"{sorted(known)}")
        if options.get("eos_token_id", None) is None:
            options.pop("eos_token_id", None)
        else:
            options["eos_token_id"] = self._eos(options["eos_token_id"])
        d = dataclasses.replace(self.defaults, **options)
        sampling = d.sampling()            # checks the sampling options
        max_new_tokens = d.max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) \
                or num_return_sequences < 1:
            raise GenerationError(f"num_return_sequences={num_return_sequences!r} must be an "
                                  f"int >= 1")
        if num_return_sequences > 1 and not sampling.do_sample:
            raise GenerationError(f"num_return_sequences={num_return_sequences} needs "
                                  f"do_sample=True: greedy decoding returns one sequence per "
                                  f"prompt")
        eos = d.eos_token_id
        pad = d.pad_token_id if d.pad_token_id is not None else (eos[0] if eos else 0)
        if not 0 <= pad < self.config.vocab_size:
            raise GenerationError(f"pad_token_id={pad} is not a token id of this model "
                                  f"(vocab_size={self.config.vocab_size})")
        prompt_rows = read_prompts(prompts, tokenizer=self.tokenizer,
                                   attention_mask=attention_mask)
        self._check_prompts(prompt_rows, max_new_tokens)
        rows = [r for r in prompt_rows for _ in range(num_return_sequences)]
        if streamer is not None and len(rows) != 1:
            raise GenerationError(f"a streamer takes one sequence; this call makes {len(rows)} "
                                  f"(prompts x num_return_sequences)")
        spec, inputs = self.spec_and_inputs(rows, sampling, max_new_tokens, eos, pad,
                                            output_logprobs)
        key = jax.random.key(secrets.randbits(32) if seed is None else seed)
        state = engine.prefill_jit(spec, self.frozen, self.lora, inputs["prompt"],
                                   inputs["start"], key, inputs["max_new"], inputs["row_ids"],
                                   inputs["done"])
        if streamer is None:
            state = engine.decode_jit(spec, self.frozen, self.lora, state, max_new_tokens)
        else:
            state = self._stream(spec, state, rows[0], inputs["prompt"].shape[1], streamer,
                                 max_new_tokens)
        return self._output(state, inputs["prompt"].shape[1], rows)

    def _stream(self, spec: engine.EngineSpec, state: engine.GenState, prompt: list[int],
                first: int, streamer: Any, max_new_tokens: int) -> engine.GenState:
        """Decode one token per call and hand each to the streamer with transformers' protocol
        (put(prompt ids), put(new ids) per token, end()), so its streamers work too. `first` is
        the slot of the first generated token."""
        streamer.put(np.asarray(prompt, np.int64))
        sent = 0
        while True:
            n, done = int(state.step), bool(state.done[0])
            if n > sent:
                streamer.put(np.asarray(state.tokens[0, first + sent:first + n], np.int64))
                sent = n
            if done or n >= max_new_tokens:
                break
            state = engine.decode_jit(spec, self.frozen, self.lora, state, n + 1)
        streamer.end()
        return state

    def _output(self, state: engine.GenState, prompt_len: int,
                rows: list[list[int]]) -> GenerateOutput:
        tokens, mask, logprobs = engine.completions(state, prompt_len)
        n = len(rows)
        width = max(int(np.max(np.asarray(state.lengths)[:n])), 1)
        tokens = np.asarray(tokens)[:n, :width]
        mask = np.asarray(mask)[:n, :width]
        logprobs = None if logprobs is None else np.asarray(logprobs)[:n, :width]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t[m].tolist(), skip_special_tokens=True)
                     for t, m in zip(tokens, mask)]
        return GenerateOutput(sequences=tokens, completion_mask=mask, logprobs=logprobs,
                              prompts=rows, texts=texts)

    def stream(self, prompt: Any, **kwargs: Any) -> Iterator[str]:
        """The decoded completion of one prompt as it is generated, piece by piece (needs a
        tokenizer); keyword arguments as for a call."""
        if self.tokenizer is None:
            raise GenerationError("stream needs a tokenizer to decode text; pass tokenizer=...")
        streamer = TextStreamer(self.tokenizer)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self(prompt, streamer=streamer, **kwargs)
            except BaseException as e:  # re-raised in the consumer's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
