"""The Flax NNX model: structure and parameters in a Module, math in `decoder.py`.

Frozen weights are `nnx.Param`s, adapters `nnx.LoRAParam`s; each variable's metadata `axes` holds
its logical axis names (`fastlora_jax/sharding.py` maps them to mesh axes). Pure form for jit'd
research code:

    graphdef, params = split(model)                 # no adapters
    graphdef, frozen, lora = split(model)           # with adapters (get_peft_model)
    logits = apply(graphdef, *states, input_ids, positions=..., segment_ids=...)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fastlora_jax.config import ModelConfig
from fastlora_jax.lora.layer import lora_project, with_constants
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
        self.use_gradient_checkpointing: bool | str = True
        self.lora: nnx.Dict | None = nnx.data(None)
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

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int = 64,
                 eos_token_id: int | list[int] | None = None) -> list[int]:
        """Greedy continuation of one prompt (new token ids only); adapters are merged first."""
        from fastlora_jax.generate import greedy_generate

        return greedy_generate(self.config, self.merged_params(), list(prompt_ids),
                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)

    def merged_params(self, dtype: Any = None) -> Params:
        """Frozen params with adapters folded in (dense; `dtype` defaults to the embedding's)."""
        frozen = self.params()
        if self.lora is None:
            return frozen
        from fastlora_jax.lora.layer import merge

        dtype = dtype or frozen["embed_tokens"]["weight"].dtype
        return merge(frozen, self.lora_params(), self.lora_spec, dtype)

    # -- adapters in and out ------------------------------------------------------------------
    def load_adapter(self, folder: str) -> None:
        """Load a PEFT adapter folder (written by us or by `peft`) onto this model."""
        from fastlora_jax.converters.peft import load_adapter
        from fastlora_jax.models.registry import family_for

        family = family_for(self.config.model_type)
        spec, lora = load_adapter(folder, self.config, family.peft_default_target_modules
                                  or family.default_target_modules)
        self.set_adapter(spec, lora)

    def save_pretrained(self, folder: str, tokenizer: Any = None, *,
                        overwrite: bool = False) -> None:
        """Write the adapter as PEFT does (adapter_config.json + adapter_model.safetensors, and
        the tokenizer's files when given), all in one atomic folder write."""
        from fastlora_jax.converters.peft import save_adapter
        from fastlora_jax.errors import ExportError

        if self.lora is None:
            raise ExportError("the model has no adapter to save; call "
                              "FastLanguageModel.get_peft_model(model, ...) first, or "
                              "save_pretrained_merged for the full model")
        save_adapter(folder, self.lora_spec, self.lora_params(),
                     base_model_name_or_path=self.name_or_path or None, tokenizer=tokenizer,
                     overwrite=overwrite)

    def save_pretrained_merged(self, folder: str, tokenizer: Any = None, *,
                               save_method: str = "merged_16bit", dtype: Any = None,
                               max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
        """`merged_16bit`: an HF checkpoint with adapters folded in (bfloat16 unless the model
        computes in float16, or `dtype` says otherwise); `lora`: the PEFT adapter only."""
        from fastlora_jax.converters.merged import save_merged
        from fastlora_jax.errors import ExportError

        if save_method == "lora":
            self.save_pretrained(folder, tokenizer, overwrite=overwrite)
            return
        if save_method != "merged_16bit":
            raise ExportError(f"save_method={save_method!r} must be 'merged_16bit' or 'lora'")
        compute = jnp.dtype(self.params()["embed_tokens"]["weight"].dtype)
        dtype = jnp.dtype(dtype) if dtype is not None else (
            compute if compute == jnp.float16 else jnp.dtype(jnp.bfloat16))
        save_merged(folder, self.config, self.merged_params(jnp.float32), dtype=dtype,
                    tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite)


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


def split(model: CausalLM) -> tuple[Any, ...]:
    """(graphdef, params) without adapters; (graphdef, frozen, lora) with adapters."""
    if model.lora is None:
        return nnx.split(model)
    return nnx.split(model, FROZEN, nnx.LoRAParam)


def apply(graphdef: nnx.GraphDef, *args: Any, **kwargs: Any) -> jax.Array:
    """`apply(graphdef, *states, input_ids, **kw)`: logits of the merged model; jit-friendly."""
    *states, input_ids = args
    model = nnx.merge(graphdef, *states)
    return forward(model.config, model.lora_spec, model.params(), model.lora_params(),
                   jnp.asarray(input_ids, jnp.int32), **kwargs)
