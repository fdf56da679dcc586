"""Vision-language checkpoints in and out: the HF folder, PEFT adapters and merged exports.

Loading: the text decoder streams through converters/hf.py's loader (the same checks, the same
NF4 / int8 quantization of its projections, bitsandbytes checkpoints as stored), its tensors
picked out and renamed by the architecture's `tensor_part`; the tower and projector (small,
never quantized: Unsloth and bitsandbytes' skip lists keep them in the compute dtype) are read
here into the tree of the architecture's `vision_specs`.

Exports write the module names transformers' class has, so PEFT's `PeftModel.from_pretrained`
and transformers' `from_pretrained` load them unchanged.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from fastlora_jax.converters.chunks import read_rows
from fastlora_jax.converters.hf import (checkpoint_dir, iter_tensors, load_params,
                                        read_config_json)
from fastlora_jax.converters.merged import hf_state_dict, write_checkpoint
from fastlora_jax.converters.peft import (adapter_config_dict, adapter_tensors, adapter_tree,
                                          check_all_used, read_adapter, write_adapter)
from fastlora_jax.errors import CheckpointError, ConfigError, ExportError
from fastlora_jax.lora.layer import merge
from fastlora_jax.lora.spec import LoraConfig
from fastlora_jax.models.decoder import Params, get_path, param_specs, set_path
from fastlora_jax.quant import QuantKind
from fastlora_jax.vision.arch import VisionArch
from fastlora_jax.vision.lora import (VisionLoraSpec, language_name, resolve_vision_lora,
                                     vision_name)
from fastlora_jax.vision.registry import config_from_hf

_LAYER = re.compile(r"^(.*?)\.layers\.(\d+)\.(.+)$")


def read_vlm_config(folder: str | pathlib.Path) -> tuple[VisionArch, Any, dict[str, Any]]:
    """(architecture, its config, the raw dict) of `folder/config.json`."""
    raw, source = read_config_json(folder)
    arch, config = config_from_hf(raw, source=str(source))
    return arch, config, raw


def vision_path(local: str) -> tuple[tuple[str, ...], int | None]:
    """"tower.layers.3.mlp.fc1.weight" -> (("tower", "layers", "mlp", "fc1", "weight"), 3)."""
    m = _LAYER.match(local)
    if m:
        return tuple(m.group(1).split(".")) + ("layers",) + tuple(m.group(3).split(".")), int(
            m.group(2))
    return tuple(local.split(".")), None


def _part(arch: VisionArch, folder: pathlib.Path, name: str) -> tuple[str, str] | None:
    try:
        return arch.tensor_part(name)
    except CheckpointError as err:
        raise CheckpointError(f"{str(folder)!r}: {err}") from None


def load_vision_params(folder: pathlib.Path, arch: VisionArch, config: Any,
                       dtype: Any) -> Params:
    """The tower and projector tree, every tensor checked against `arch.vision_specs`."""
    specs = {s.path: s for s in arch.vision_specs(config)}
    stacks: dict[tuple[str, ...], tuple[np.ndarray, list[bool]]] = {}
    tree: Params = {}
    np_dtype = jnp.dtype(dtype)
    for name, file, _ in iter_tensors(folder):
        part = _part(arch, folder, name)
        if part is None or part[0] != "vision":
            continue
        path, layer = vision_path(part[1])
        spec = specs.get(path)
        if spec is None or spec.stacked != (layer is not None):
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} is not a parameter of this "
                                  f"{arch.model_type!r} model's vision part; the checkpoint and "
                                  f"its config.json disagree")
        value = read_rows(file, name)
        if tuple(value.shape) != spec.layer_shape:
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} has shape "
                                  f"{list(value.shape)}, expected {list(spec.layer_shape)} from "
                                  f"config.json")
        value = value.astype(np_dtype)
        if layer is None:
            set_path(tree, path, jnp.asarray(value))
            continue
        if layer >= spec.shape[0]:
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} names vision layer {layer}, "
                                  f"but the tower has {spec.shape[0]} layers")
        buf, seen = stacks.setdefault(path, (np.empty(spec.shape, np_dtype),
                                             [False] * spec.shape[0]))
        buf[layer] = value
        seen[layer] = True
    for path, (buf, seen) in stacks.items():
        if all(seen):
            set_path(tree, path, jnp.asarray(buf))
    missing = []
    for path, spec in specs.items():
        try:
            get_path(tree, path)
        except KeyError:
            missing.append(arch.tensor_name(path, 0 if spec.stacked else None))
    if missing:
        raise CheckpointError(f"{str(folder)!r}: the checkpoint lacks {len(missing)} vision "
                              f"tensor(s) that config.json needs, e.g. {missing[:4]}; the "
                              f"download is incomplete or config.json describes another model")
    return tree


def load_vlm(folder: str | pathlib.Path, *, dtype: Any,
             quantize: QuantKind | None = None) -> tuple[VisionArch, Any, Params]:
    """(architecture, config, {"language": ..., "vision": ...}) of a checkpoint folder."""
    folder = checkpoint_dir(folder)
    arch, config, _ = read_vlm_config(folder)

    def language(name: str) -> str | None:
        part = _part(arch, folder, name)
        return part[1] if part is not None and part[0] == "language" else None

    params = {"language": load_params(folder, config.text, dtype=dtype, quantize=quantize,
                                      rename=language),
              "vision": load_vision_params(folder, arch, config, dtype)}
    return arch, config, params


def vlm_adapter_tensors(arch: VisionArch, spec: VisionLoraSpec,
                        lora: Params) -> dict[str, np.ndarray]:
    """{PEFT key: float32 array} of both parts' adapters, under the HF class's module names."""
    out: dict[str, np.ndarray] = {}
    if spec.language is not None:
        out.update(adapter_tensors(spec.language, lora["language"],
                                   module_name=lambda i, g, n: language_name(arch, i, g, n)))
    if spec.vision is not None:
        out.update(adapter_tensors(spec.vision, lora["vision"]["tower"],
                                   module_name=lambda i, g, n: vision_name(arch, i, g, n)))
    return out


def save_vlm_adapter(folder: str | pathlib.Path, arch: VisionArch, spec: VisionLoraSpec | None,
                     lora: Params | None, *, base_model_name_or_path: str | None,
                     processor: Any = None, overwrite: bool = False) -> pathlib.Path:
    """A PEFT adapter folder for the architecture's transformers class, written atomically."""
    if spec is None or lora is None:
        raise ExportError("the model has no adapter to save; call "
                          "FastVisionModel.get_peft_model(model, ...) first, or "
                          "save_pretrained_merged for the full model")
    part = spec.language or spec.vision
    config = adapter_config_dict(part, base_model_name_or_path)
    config["target_modules"] = spec.config.target_modules
    if not isinstance(config["target_modules"], str):
        config["target_modules"] = sorted(config["target_modules"])
    return write_adapter(folder, config, vlm_adapter_tensors(arch, spec, lora),
                         tokenizer=processor, overwrite=overwrite)


def load_vlm_adapter(folder: str | pathlib.Path, arch: VisionArch, config: Any,
                     dtype: Any = jnp.float32) -> tuple[VisionLoraSpec, Params]:
    """Read a PEFT adapter (ours or peft's) for the architecture's transformers class: its
    target_modules resolve over both parts' module names, every tensor's shape is checked."""
    def resolve_spec(lora_config: LoraConfig) -> VisionLoraSpec:
        if lora_config.target_modules is None:
            raise ConfigError("target_modules is null; a vision-language adapter must name its "
                              "modules (a list or a regex)")
        return resolve_vision_lora(arch, config, lora_config)

    spec, path, tensors = read_adapter(folder, resolve_spec)
    used: set[str] = set()
    lora: Params = {}
    if spec.language is not None:
        lora["language"] = adapter_tree(
            spec.language, tensors, used, path, param_specs(config.text), config.text.num_layers,
            lambda i, g, n: language_name(arch, i, g, n), dtype)
    if spec.vision is not None:
        tower = [dataclasses.replace(s, path=s.path[1:]) for s in arch.vision_specs(config)
                 if s.path[0] == "tower"]
        lora["vision"] = {"tower": adapter_tree(
            spec.vision, tensors, used, path, tower, config.vision.num_layers,
            lambda i, g, n: vision_name(arch, i, g, n), dtype)}
    check_all_used(tensors, used, path)
    return spec, lora


def merged_params(arch: VisionArch, config: Any, frozen: Params, lora: Params | None,
                  spec: VisionLoraSpec | None) -> Params:
    """Both parts dense in float32 with the adapters folded in."""
    language = merge(frozen["language"], None if lora is None else lora["language"],
                     None if spec is None else spec.language, jnp.float32)
    vision = dict(frozen["vision"])
    if spec is not None and spec.vision is not None and lora is not None:
        vision["tower"] = merge(frozen["vision"]["tower"], lora["vision"]["tower"], spec.vision,
                                jnp.float32)
    return {"language": language, "vision": vision}


def vlm_state_dict(arch: VisionArch, config: Any, params: Params,
                   dtype: Any) -> dict[str, np.ndarray]:
    """{HF name: array in `dtype`} of dense params, with the transformers class's names."""
    out = {}
    for name, value in hf_state_dict(config.text, params["language"], dtype).items():
        if name.startswith("model."):
            name = arch.language_prefix + name[len("model"):]
        out[name] = value
    np_dtype = jnp.dtype(dtype)
    for spec in arch.vision_specs(config):
        value = np.asarray(get_path(params["vision"], spec.path)).astype(np_dtype)
        if spec.stacked:
            for layer in range(spec.shape[0]):
                out[arch.tensor_name(spec.path, layer)] = np.ascontiguousarray(value[layer])
        else:
            out[arch.tensor_name(spec.path, None)] = value
    return out


def save_vlm_merged(folder: str | pathlib.Path, arch: VisionArch, config: Any, frozen: Params,
                    lora: Params | None, spec: VisionLoraSpec | None, *, dtype: Any = None,
                    processor: Any = None, max_shard_size: int | str = "5GB",
                    overwrite: bool = False) -> pathlib.Path:
    """An HF checkpoint of the whole model with the adapters folded in (bfloat16 unless the
    model computes in float16 or `dtype` says otherwise)."""
    compute = jnp.dtype(frozen["language"]["embed_tokens"]["weight"].dtype)
    dtype = jnp.dtype(dtype) if dtype is not None else (
        compute if compute == jnp.float16 else jnp.dtype(jnp.bfloat16))
    state = vlm_state_dict(arch, config, merged_params(arch, config, frozen, lora, spec), dtype)
    hf_config = arch.config_to_hf(config)
    hf_config["dtype"] = dtype.name
    hf_config.pop("quantization_config", None)
    return write_checkpoint(folder, state, hf_config, tokenizer=processor,
                            max_shard_size=max_shard_size, overwrite=overwrite)


__all__ = ["load_vlm", "load_vlm_adapter", "read_vlm_config", "save_vlm_adapter",
           "save_vlm_merged"]
