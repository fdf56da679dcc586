"""Merged export: a plain HF checkpoint (config.json, safetensors shards <= 5 GB with an index,
tokenizer files) that transformers loads with `from_pretrained`.

`save_pretrained_merged` is what `CausalLM.save_pretrained_merged` runs: adapters are folded into
the frozen weights in float32 (quantized weights dequantized first), then rounded once to the
export dtype; `save_merged` writes dense parameters as they are.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors.numpy import save_file

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters.atomic import atomic_folder
from fastlora_jax.converters.names import path_to_hf
from fastlora_jax.converters.peft import save_adapter
from fastlora_jax.errors import ExportError
from fastlora_jax.lora.layer import merge
from fastlora_jax.lora.spec import LoraSpec
from fastlora_jax.models.decoder import Params, get_path, param_specs
from fastlora_jax.models.registry import config_to_hf

SHARD_PATTERN = "model{suffix}.safetensors"
SAVE_METHODS = ("merged_16bit", "lora")


def hf_state_dict(config: ModelConfig, params: Params, dtype: Any) -> dict[str, np.ndarray]:
    """{HF name: numpy array in `dtype`} for dense params (layers unstacked)."""
    np_dtype = jnp.dtype(dtype)
    out: dict[str, np.ndarray] = {}
    for spec in param_specs(config):
        value = np.asarray(get_path(params, spec.path)).astype(np_dtype)
        if spec.stacked:
            for layer in range(config.num_layers):
                out[path_to_hf(spec.path, layer)] = np.ascontiguousarray(value[layer])
        else:
            out[path_to_hf(spec.path, None)] = value
    return out


def save_merged(folder: str | pathlib.Path, config: ModelConfig, params: Params, *,
                dtype: Any, tokenizer: Any = None, max_shard_size: int | str = "5GB",
                overwrite: bool = False) -> pathlib.Path:
    """Write `params` (dense, adapters already merged) as an HF checkpoint, atomically."""
    state = hf_state_dict(config, params, dtype)
    hf_config = config_to_hf(config)
    hf_config.pop("torch_dtype", None)
    hf_config.pop("quantization_config", None)  # the merged weights are dense
    hf_config["dtype"] = jnp.dtype(dtype).name
    return write_checkpoint(folder, state, hf_config, tokenizer=tokenizer,
                            max_shard_size=max_shard_size, overwrite=overwrite)


def write_checkpoint(folder: str | pathlib.Path, state: dict[str, np.ndarray],
                     hf_config: dict[str, Any], *, tokenizer: Any = None,
                     max_shard_size: int | str = "5GB", overwrite: bool = False) -> pathlib.Path:
    """Write {HF name: array} as safetensors shards (with an index when sharded), config.json
    and the tokenizer's (or processor's) files into `folder`, atomically."""
    folder = pathlib.Path(folder)
    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda a: a.nbytes, filename_pattern=SHARD_PATTERN,
        max_shard_size=max_shard_size)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
                     "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder


def save_pretrained_merged(folder: str | pathlib.Path, config: ModelConfig, frozen: Params,
                           lora: Params | None, spec: LoraSpec | None, *,
                           save_method: str = "merged_16bit", dtype: Any = None,
                           tokenizer: Any = None, max_shard_size: int | str = "5GB",
                           base_model_name_or_path: str | None = None,
                           overwrite: bool = False) -> pathlib.Path:
    """Unsloth's `save_pretrained_merged`: `merged_16bit` writes an HF checkpoint with the
    adapters folded in, in `dtype` (default bfloat16, or float16 when the model computes in
    float16); `lora` writes the PEFT adapter only (`peft.save_adapter`)."""
    if save_method not in SAVE_METHODS:
        raise ExportError(f"save_method={save_method!r} must be one of {list(SAVE_METHODS)}")
    if save_method == "lora":
        return save_adapter(folder, spec, lora, base_model_name_or_path=base_model_name_or_path,
                            tokenizer=tokenizer, overwrite=overwrite)
    compute = jnp.dtype(frozen["embed_tokens"]["weight"].dtype)
    dtype = jnp.dtype(dtype) if dtype is not None else (
        compute if compute == jnp.float16 else jnp.dtype(jnp.bfloat16))
    params = merge(frozen, lora, spec, jnp.float32)  # quantized weights dense, adapters folded in
    return save_merged(folder, config, params, dtype=dtype, tokenizer=tokenizer,
                       max_shard_size=max_shard_size, overwrite=overwrite)
