"""Merged export: a plain HF checkpoint (config.json, safetensors shards <= 5 GB with an index,
tokenizer files) that transformers loads with `from_pretrained`."""

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
from fastlora_jax.models.decoder import Params, get_path, param_specs
from fastlora_jax.models.registry import config_to_hf

SHARD_PATTERN = "model{suffix}.safetensors"


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
    folder = pathlib.Path(folder)
    state = hf_state_dict(config, params, dtype)
    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda a: a.nbytes, filename_pattern=SHARD_PATTERN,
        max_shard_size=max_shard_size)
    hf_config = config_to_hf(config)
    dtype_name = jnp.dtype(dtype).name
    hf_config.pop("torch_dtype", None)
    hf_config.pop("quantization_config", None)  # the merged weights are dense
    hf_config["dtype"] = dtype_name
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
