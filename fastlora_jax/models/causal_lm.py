"""The Flax NNX model: structure and parameters in a Module, math in `decoder.py`.

Frozen weights are `nnx.Param`s, adapters `nnx.LoRAParam`s; each variable's metadata `axes` holds
its logical axis names (`fastlora_jax/sharding.py` maps them to mesh axes). Pure form for jit'd
research code:

    graphdef, frozen, lora = split(model)           # lora is an empty State without adapters
    logits = apply(graphdef, frozen, lora, input_ids, positions=..., segment_ids=...)
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters.merged import save_pretrained_merged
from fastlora_jax.converters.peft import load_adapter, save_adapter
from fastlora_jax.lora.layer import lora_project, merge, with_constants
from fastlora_jax.generation.config import GenerationConfig
from fastlora_jax.lora.spec import LoraSpec
from fastlora_jax.models import decoder
from fastlora_jax.models.decoder import Params, get_path, param_specs

FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

LORA_AXES = {"lora_A": ("layers", "lora_rank", "embed"), "lora_B": ("layers", "embed", "lora_rank"),
             "lora_magnitude": ("layers", "embed")}


class CausalLM(nnx.Module):
    """A decoder-only language model. `model(input_ids)` -> logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig, params: Params, *, max_seq_length: int = 2048,
                 name_or_path: str = "") -> None:
        self.config = config
        self.max_seq_length = max_seq_length
        self.name_or_path = name_or_path
        self.lora_spec: LoraSpec | None = None
        self.lora: nnx.Dict | None = nnx.data(None)
        self.generation_config = GenerationConfig()
        tree: dict[str, Any] = {}
        for spec in param_specs(config):
            node = tree
            for key in spec.path[:-1]:
                node = node.setdefault(key, {})
            node[spec.path[-1]] = nnx.Param(get_path(params, spec.path), axes=spec.axes)
        for name, sub in tree.items():
            setattr(self, name, _to_nnx(sub))

    # -- parameters ---------------------------------------------------------------------------
    def params(self) -> Params:
        """The frozen parameters as a plain nested dict (the pure form's `frozen`)."""
        return nnx.to_pure_dict(nnx.state(self, FROZEN))

    def lora_params(self) -> Params | None:
        """The adapter parameters as a plain nested dict, or None without adapters."""
        if self.lora is None:
            return None
        return nnx.to_pure_dict(nnx.state(self, nnx.LoRAParam))["lora"]

    def set_adapter(self, spec: LoraSpec, lora: Params) -> None:
        """Attach adapters (replacing any); `lora` follows `fastlora_jax/lora/layer.py`'s tree."""
        self.lora_spec = spec
        self.lora = nnx.data(_to_nnx(lora, leaf=lambda path, a: nnx.LoRAParam(a, axes=LORA_AXES[path[-1]])))

    # -- calls --------------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, attention_impl: Any = None) -> jax.Array:
        """input_ids int32 [B, T] -> logits [B, T, V]; positions / segment_ids int32 [B, T]."""
        return _forward_jit(self.config, self.lora_spec, self.params(), self.lora_params(),
                            jnp.asarray(input_ids, jnp.int32), positions=positions,
                            segment_ids=segment_ids, attention_impl=attention_impl)

    def generate(self, prompts: Any, max_new_tokens: int | None = None, *,
                 tokenizer: Any = None, merge_adapters: bool | None = None,
                 disable_adapters: bool = False, **options: Any) -> Any:
        """Continue each prompt with the KV-cache engine; returns a `GenerateOutput`
        (`.sequences`, `.completion_mask`, `.logprobs`, `.tokens`, `.texts`).

        prompts: input_ids [batch, seq] (with `attention_mask=` if padded), a list of token
        ids, a list of token id lists (ragged: each row's result equals its result alone), a
        string or a list of strings (with `tokenizer`). options: transformers' `generate`
        arguments with its semantics — do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, eos_token_id (one or several), pad_token_id,
        num_return_sequences — plus seed (sampling; None: a fresh one), output_logprobs
        (log p of each token under the model) and streamer (transformers' protocol, e.g.
        `fastlora_jax.generation.TextStreamer`). Options not given come from
        `self.generation_config` (the checkpoint's generation_config.json). Adapters apply
        unmerged unless merge_adapters (default: generation_config.merge_adapters);
        disable_adapters generates with the base weights (no copy).
        """
        from fastlora_jax.generation.generator import Generator

        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        gen = Generator(self, tokenizer=tokenizer, merge_adapters=merge_adapters,
                        disable_adapters=disable_adapters)
        return gen(prompts, **options)

    def merged_params(self, dtype: Any = None) -> Params:
        """Frozen params with adapters folded in (dense; `dtype` defaults to the embedding's)."""
        frozen = self.params()
        if self.lora is None:
            return frozen
        dtype = dtype or frozen["embed_tokens"]["weight"].dtype
        return merge(frozen, self.lora_params(), self.lora_spec, dtype)

    # -- adapters in and out (the formats live in converters/) ---------------------------------
    def load_adapter(self, folder: str) -> None:
        """Load a PEFT adapter folder (written by us or by `peft`) onto this model."""
        self.set_adapter(*load_adapter(folder, self.config))

    def save_pretrained(self, folder: str, tokenizer: Any = None, *,
                        overwrite: bool = False) -> None:
        """Write the adapter as PEFT does (adapter_config.json + adapter_model.safetensors, and
        the tokenizer's files when given), all in one atomic folder write."""
        save_adapter(folder, self.lora_spec, self.lora_params(),
                     base_model_name_or_path=self.name_or_path or None, tokenizer=tokenizer,
                     overwrite=overwrite)

    def save_pretrained_merged(self, folder: str, tokenizer: Any = None, *,
                               save_method: str = "merged_16bit", dtype: Any = None,
                               max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
        """`merged_16bit`: an HF checkpoint with adapters folded in (bfloat16 unless the model
        computes in float16, or `dtype` says otherwise); `lora`: the PEFT adapter only."""
        save_pretrained_merged(folder, self.config, self.params(), self.lora_params(),
                               self.lora_spec, save_method=save_method, dtype=dtype,
                               tokenizer=tokenizer, max_shard_size=max_shard_size,
                               base_model_name_or_path=self.name_or_path or None,
                               overwrite=overwrite)

    def save_pretrained_gguf(self, folder: str, tokenizer: Any = None, *,
                             quantization_method: str = "q8_0", save_method: str = "merged",
                             overwrite: bool = False, show_progress: bool = True) -> Any:
        """llama.cpp / Ollama export; returns the written file's path.

        `merged`: `<folder>/model.<METHOD>.gguf` (adapters folded in float32, NF4 / int8 bases
        dequantized first, then encoded as `quantization_method`: f32, f16, bf16, q8_0, q4_0,
        q4_1, q5_0, q5_1, q4_k_m, q5_k_m, q6_k) and an Ollama `Modelfile`. `lora`:
        `<folder>/adapter.gguf`, the adapter alone, for llama.cpp's `--lora` on the base GGUF.
        """
        from fastlora_jax.converters.gguf import save_gguf, save_gguf_lora
        from fastlora_jax.errors import ExportError

        if save_method == "lora":
            return save_gguf_lora(folder, self.config, self.lora_params(), self.lora_spec,
                                  overwrite=overwrite, show_progress=show_progress)
        if save_method != "merged":
            raise ExportError(f"save_method={save_method!r} must be 'merged' or 'lora'")
        return save_gguf(folder, self.config, self.params(), tokenizer,
                         lora=self.lora_params(), lora_spec=self.lora_spec,
                         quantization_method=quantization_method,
                         name=pathlib.Path(self.name_or_path or str(folder)).name,
                         overwrite=overwrite, show_progress=show_progress)


def _to_nnx(tree: dict[str, Any], leaf: Any = None, path: tuple[str, ...] = ()) -> nnx.Dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _to_nnx(v, leaf, path + (k,))
        else:
            out[k] = leaf(path + (k,), v) if leaf is not None else v
    return nnx.Dict(out)


def forward(config: ModelConfig, lora_spec: LoraSpec | None, frozen: Params,
            lora: Params | None, input_ids: jax.Array, *, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, attention_impl: Any = None,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits of the model with optional adapters (dropout only when `dropout_key` is given)."""
    if lora is None:
        return decoder.forward(config, frozen, input_ids, positions=positions,
                               segment_ids=segment_ids, attention_impl=attention_impl)
    return decoder.forward(config, frozen, input_ids, positions=positions,
                           segment_ids=segment_ids, attention_impl=attention_impl,
                           lora=with_constants(lora, lora_spec, dropout_key),
                           project=lora_project(lora_spec, train=dropout_key is not None))


@functools.partial(jax.jit, static_argnames=("config", "lora_spec", "attention_impl"))
def _forward_jit(config: ModelConfig, lora_spec: LoraSpec | None, frozen: Params,
                 lora: Params | None, input_ids: jax.Array, *, positions: jax.Array | None,
                 segment_ids: jax.Array | None, attention_impl: Any) -> jax.Array:
    return forward(config, lora_spec, frozen, lora, input_ids, positions=positions,
                   segment_ids=segment_ids, attention_impl=attention_impl)


def split(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, frozen, lora), whether or not the model has adapters (then `lora` is empty)."""
    return nnx.split(model, FROZEN, nnx.LoRAParam)


def apply(graphdef: nnx.GraphDef, frozen: nnx.State, lora: nnx.State, input_ids: jax.Array,
          **kwargs: Any) -> jax.Array:
    """Logits of the model `split` took apart (keywords as in `forward`); jit-friendly."""
    model = nnx.merge(graphdef, frozen, lora)
    return forward(model.config, model.lora_spec, model.params(), model.lora_params(),
                   jnp.asarray(input_ids, jnp.int32), **kwargs)
