"""Generation with images: the prompt's embeddings (images in place) prefill the KV-cache engine
(`fastlora_jax/generation/engine.py`), then text decoding runs on the cache as for a text model.

The images only enter through the prefill, so the decode loop is the text model's, compiled
once per (batch, cache length). Vision LoRA adapters act on the image embeddings, language
adapters on every step, unmerged.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.errors import GenerationError
from fastlora_jax.generation import engine
from fastlora_jax.generation.sampling import SamplingConfig
from fastlora_jax.vision.forward import input_embeddings

if TYPE_CHECKING:
    from fastlora_jax.vision.model import VisionLM


@dataclasses.dataclass
class VisionGenerateOutput:
    """sequences: int32 [B, T] generated tokens (pad after a row's end); completion_mask:
    bool [B, T]; texts: decoded completions when the model has a processor."""

    sequences: np.ndarray
    completion_mask: np.ndarray
    texts: list[str] | None = None

    @property
    def tokens(self) -> list[list[int]]:
        return [row[mask].tolist() for row, mask in zip(self.sequences, self.completion_mask)]


_embeddings_jit = jax.jit(input_embeddings, static_argnums=(0, 1, 2))


def _start(inputs: Mapping[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """[B] first real slot of each row from a left-padded attention_mask (all 0 without one)."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return np.zeros((shape[0],), np.int32)
    mask = np.asarray(mask).astype(bool).reshape(shape)
    start = shape[1] - mask.sum(axis=1)
    if not all(mask[b, s:].all() for b, s in enumerate(start)):
        raise GenerationError("attention_mask must be left-padded for generation (the "
                              "processor's padding_side='left'); found padding inside a row")
    return start.astype(np.int32)


def generate(model: "VisionLM", inputs: Mapping[str, Any], *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = 50,
             top_p: float = 1.0, min_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None) -> VisionGenerateOutput:
    """Continue each row of a processor output (input_ids [B, P] left-padded, its
    attention_mask, the image arrays); transformers' `generate` arguments and semantics."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    batch = model.batch(inputs)
    ids = batch["input_ids"]
    b, p = ids.shape
    start = _start(inputs, (b, p))
    tokenizer = getattr(model.processor, "tokenizer", None)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    eos = () if eos_token_id is None else (
        (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer))
        else tuple(int(e) for e in eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    spec = model.lora_spec
    lang_spec = None if spec is None else spec.language
    lang_lora = None if model.lora is None or lang_spec is None else model.lora["language"]
    espec = engine.EngineSpec(config=model.config.text, lora_spec=lang_spec, sampling=sampling,
                              cache_len=p + max_new_tokens, eos_ids=eos, pad_id=int(pad))
    embeds, blocks = _embeddings_jit(model.arch, model.config, spec, model.frozen, model.lora,
                                     batch)
    key = jax.random.key(secrets.randbits(31) if seed is None else seed)
    language = model.frozen["language"]
    positions = (None if model.arch.positions is None
                 else model.arch.positions(model.config, ids, batch))
    state = engine.prefill_jit(espec, language, lang_lora, ids, jnp.asarray(start), key,
                               jnp.asarray(max_new_tokens, jnp.int32), inputs_embeds=embeds,
                               bidirectional_ids=blocks, positions=positions,
                               position_offset=batch.get("rope_deltas"))
    state = engine.decode_jit(espec, language, lang_lora, state)
    tokens, mask, _ = engine.completions(state, p)
    sequences, completion = np.asarray(tokens), np.asarray(mask)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
                 for row, m in zip(sequences, completion)]
    return VisionGenerateOutput(sequences=sequences, completion_mask=completion, texts=texts)
