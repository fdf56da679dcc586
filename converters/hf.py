"""Read a Hugging Face checkpoint folder (config.json + safetensors, single or sharded).

Tensors stream one at a time from disk; each is checked (name, dtype, shape), converted (a dtype
cast, or, with `quantize`, the decoder projections quantized one layer at a time by
`fastlora_jax.quant.quantize`) and put in place, so host memory holds the model as it will be kept
plus about one tensor, never the checkpoint. Nothing larger than `chunk_bytes` is held whole on the
host beyond one layer of a quantized projection (see converters/chunks.py for why whole-tensor
reads cost 3x):
- a tensor is read through its own short-lived safetensors handle, in row chunks when large, so the
  memory-mapped pages it touched are released as soon as it is read;
- an unstacked parameter (embeddings, final norm, lm_head) larger than `chunk_bytes` is converted
  chunk by chunk and written into a preallocated device buffer;
- a stacked parameter [L, ...] is assembled layer by layer: in a preallocated device buffer when the
  stack is larger than `chunk_bytes`, else in a host buffer moved to the device once complete.
At the end every expected parameter must have been filled and every tensor in the files used.
`.bin` (pickle) checkpoints are refused: we never unpickle.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters.chunks import (CHUNK_BYTES, device_zeros, read_rows, read_whole,
                                            row_chunks, write_rows)
from fastlora_jax.converters.names import hf_to_path, path_to_hf
from fastlora_jax.errors import CheckpointError, ConfigError
from fastlora_jax.quant import QuantKind, from_bnb_4bit, from_bnb_int8, quantize as quantize_weight
from fastlora_jax.models.decoder import ParamSpec, Params, is_projection, param_specs, set_path
from fastlora_jax.models.registry import config_from_hf

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = {"F32": np.float32, "BF16": "bfloat16", "F16": np.float16}
MISSING_SHOWN = 8  # missing tensor names an error lists before "and N more"
CONVERT_BIN = ("convert it once in a PyTorch environment: AutoModelForCausalLM.from_pretrained("
               "DIR).save_pretrained(OUT) with transformers writes model.safetensors")


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Check that `path` is an existing folder with a config.json."""
    folder = pathlib.Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint path {str(folder)!r} does not exist; pass a folder "
                              f"holding config.json and *.safetensors")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {str(folder)!r} is a file, expected a folder "
                              f"holding config.json and *.safetensors")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder / 'config.json')!r} is missing: the folder is not a "
                              f"Hugging Face model checkpoint")
    return folder


def read_config_json(path: str | pathlib.Path) -> tuple[Any, pathlib.Path]:
    """(the decoded `path/config.json`, its path) of a checkpoint folder."""
    source = checkpoint_dir(path) / "config.json"
    try:
        return json.loads(source.read_text()), source
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(source)!r} is not valid JSON ({err}); re-download or "
                              f"re-save the checkpoint") from None


def read_config(path: str | pathlib.Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Parse `path/config.json` into (ModelConfig, the raw dict)."""
    raw, source = read_config_json(path)
    return config_from_hf(raw, source=str(source)), raw


def weight_files(folder: pathlib.Path) -> dict[pathlib.Path, list[str] | None]:
    """{file: names it must hold (from the index) or None (unsharded)}."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{str(index)!r} is not a safetensors index (expected JSON with "
                                  f"a 'weight_map' object): {err}") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(n, str) and isinstance(f, str) and f and pathlib.Path(f).name == f
                for n, f in weight_map.items()):
            raise CheckpointError(f"{str(index)!r}: 'weight_map' must map tensor names to shard "
                                  f"file names in the same folder, found {str(weight_map)[:120]}")
        files: dict[pathlib.Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(folder / shard, []).append(name)
        for shard in files:
            if not shard.is_file():
                raise CheckpointError(f"{str(index)!r} names shard {shard.name!r}, which is not in "
                                      f"{str(folder)!r}; the download is incomplete — fetch the "
                                      f"missing shard")
        return dict(files)
    single = folder / SINGLE_NAME
    if single.is_file():
        return {single: None}
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return {found[0]: None}
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")) + sorted(p.name for p in folder.glob("*.pth"))
    if pickles:
        raise CheckpointError(f"{str(folder)!r} holds its weights only as pickle files "
                              f"({', '.join(pickles[:4])}{' …' if len(pickles) > 4 else ''}), "
                              f"which fastlora_jax never unpickles (they can run code); "
                              f"{CONVERT_BIN}")
    raise CheckpointError(f"{str(folder)!r} has no {SINGLE_NAME} and no {INDEX_NAME}"
                          + (f" but several *.safetensors ({[f.name for f in found]}): add the index"
                             if found else ""))


def _open(file: pathlib.Path) -> Any:
    """A safetensors handle of `file` (its header parsed), or a CheckpointError."""
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file ({err}); it "
                              f"is truncated or corrupt — re-download it") from None


def check_layer_count(folder: pathlib.Path, config: ModelConfig,
                      rename: Callable[[str], str | None] | None = None) -> None:
    """The files hold tensors of exactly the layers 0..num_layers-1 that config.json names
    (checked on the headers, before any [num_layers, ...] buffer is allocated); `rename` as in
    `load_params`."""
    layers: set[int] = set()
    for file, names in weight_files(folder).items():
        if names is None:
            with _open(file) as f:
                names = list(f.keys())
        if rename is not None:
            names = [n for n in map(rename, names) if n is not None]
        layers.update(layer for layer in (hf_to_path(n)[1] for n in names) if layer is not None)
    want = config.num_layers
    if layers and max(layers) >= want:
        raise CheckpointError(f"{str(folder)!r}: the checkpoint holds layer {max(layers)} but "
                              f"config.json has num_hidden_layers={want}; the checkpoint and its "
                              f"config disagree")
    if len(layers) < want:
        absent = list(itertools.islice((i for i in range(want) if i not in layers), 8))
        raise CheckpointError(f"{str(folder)!r}: config.json has num_hidden_layers={want} but the "
                              f"checkpoint holds no tensor of {want - len(layers)} of them (layers "
                              f"{absent}{' …' if want - len(layers) > 8 else ''}); the download "
                              f"is incomplete or config.json describes another model")


def iter_tensors(folder: pathlib.Path) -> Iterator[tuple[str, pathlib.Path, Any]]:
    """Yield (name, file, safetensors slice) for every tensor, file by file, with clear errors."""
    for file, names in weight_files(folder).items():
        with _open(file) as f:
            keys = list(f.keys())
            if names is not None:
                missing = sorted(set(names) - set(keys))
                if missing:
                    raise CheckpointError(f"{str(file)!r} lacks tensors that {INDEX_NAME} places "
                                          f"there: {missing[:5]}; the shard and the index disagree")
            for name in keys:
                yield name, file, f


# Pre-quantized bitsandbytes checkpoints: a Linear's `weight` (uint8 / int8) comes with these.
BNB4_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
              "quant_state.bitsandbytes__nf4")
_BNB_PART = re.compile(r"^(.*\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|"
                       r"quant_state\.bitsandbytes__(?:nf4|fp4))$|^(.*)\.(SCB|weight_format)$")


def _quantized_leaf(group: dict[str, np.ndarray], weight_name: str, dtype: Any) -> Any | None:
    """A QTensor once every part of one pre-quantized weight has been read, else None."""
    if "weight" not in group:
        return None
    if "SCB" in group:
        return from_bnb_int8(group["weight"], group["SCB"], dtype=jnp.dtype(dtype).name,
                             name=weight_name)
    if group["weight"].dtype == np.int8:
        return None  # its SCB has not been read yet
    if "quant_state.bitsandbytes__fp4" in group or all(part in group for part in BNB4_PARTS):
        q = from_bnb_4bit({("weight." + k if k != "weight" else k): v for k, v in group.items()},
                          prefix=weight_name[: -len("weight")])
        return dataclasses.replace(q, dtype=jnp.dtype(dtype).name)
    return None


def load_params(folder: str | pathlib.Path, config: ModelConfig, *, dtype: Any,
                quantize: QuantKind | None = None, chunk_bytes: int = CHUNK_BYTES,
                rename: Callable[[str], str | None] | None = None) -> Params:
    """Stream every tensor of the checkpoint into our parameter tree (see module doc).

    `rename` maps each stored tensor name to the text model's HF name, or to None for a tensor
    that is not the text model's (a vision-language checkpoint's tower and projector, which the
    caller loads itself); None keeps every name as stored.

    Float tensors are cast to `dtype`; with `quantize`, the decoder projections
    (`models.decoder.is_projection`) are quantized to that kind instead, dequantizing to `dtype`.
    bitsandbytes 4-bit / 8-bit weights are assembled into QTensors as stored, without
    requantizing. `chunk_bytes` (bytes, > 0) bounds the pieces larger tensors are read and moved
    in; it does not change the result.
    """
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes={chunk_bytes!r} must be a positive number of bytes")
    if quantize is not None and not isinstance(quantize, QuantKind):
        raise ConfigError(f"quantize={quantize!r} must be a QuantKind or None")
    folder = checkpoint_dir(folder)
    check_layer_count(folder, config, rename)
    specs = {spec.path: spec for spec in param_specs(config)}
    np_dtype = jnp.dtype(dtype)
    pending: dict[tuple[str, ...], tuple[Any, list[bool]]] = {}
    filled: dict[tuple[str, ...], int] = {}
    quant_groups: dict[str, dict[str, np.ndarray]] = {}
    params: Params = {}

    def place(name: str, file: pathlib.Path, spec: ParamSpec, layer: int | None, leaf: Any) -> None:
        path = spec.path
        if not spec.stacked:
            if path in filled:
                raise CheckpointError(f"{str(file)!r}: tensor {name!r} appears twice")
            filled[path] = 1
            set_path(params, path, jax.device_put(leaf))
            return
        # One buffer [L, ...] per stacked parameter, filled layer by layer in place: on the device
        # when the stack is large (the host then holds one layer at a time), else on the host and
        # moved to the device (then freed) as soon as its last layer arrives.
        if path not in pending:
            L = config.num_layers
            on_device = L * sum(a.nbytes for a in jax.tree.leaves(leaf)) > chunk_bytes
            new = (lambda a: device_zeros((L,) + a.shape, a.dtype)) if on_device else (
                lambda a: np.empty((L,) + a.shape, a.dtype))
            pending[path] = (jax.tree.map(new, leaf), [False] * L)
        buffer, seen = pending[path]
        if seen[layer]:
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} appears twice")
        if isinstance(jax.tree.leaves(buffer)[0], jax.Array):
            buffer = jax.tree.map(lambda buf, a: write_rows(buf, a[None], layer), buffer, leaf)
            pending[path] = (buffer, seen)
        else:
            jax.tree.map(lambda buf, a: buf.__setitem__(layer, a), buffer, leaf)
        seen[layer] = True
        filled[path] = filled.get(path, 0) + 1
        if filled[path] == config.num_layers:
            del pending[path]
            set_path(params, path, jax.device_put(buffer))
            del buffer

    def lookup(name: str, file: pathlib.Path) -> tuple[ParamSpec | None, int | None]:
        path, layer = hf_to_path(name)
        spec = specs.get(path)
        if spec is None:
            if path == ("lm_head", "weight") and config.tie_embeddings:
                return None, None  # a tied checkpoint may also store the (identical) output matrix
            raise CheckpointError(
                f"{str(file)!r}: tensor {name!r} is not a parameter of a {config.model_type!r} "
                f"model with this config.json; the checkpoint and its config disagree "
                f"(expected names like 'model.layers.0.self_attn.q_proj.weight')")
        if spec.stacked != (layer is not None) or (layer is not None and layer >= config.num_layers):
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} names layer {layer}, but "
                                  f"config.json has num_hidden_layers={config.num_layers}")
        return spec, layer

    for stored, file, f in iter_tensors(folder):
        name = stored if rename is None else rename(stored)
        if name is None:
            continue
        part = _BNB_PART.match(name)
        sl = f.get_slice(stored)
        file_dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
        if part or (file_dtype in ("U8", "I8") and name.endswith(".weight")):
            weight_name = (part.group(1) or part.group(3) + ".weight") if part else name
            suffix = (part.group(2) or part.group(4)) if part else "weight"
            spec, layer = lookup(weight_name, file)
            if spec is None or suffix == "weight_format":
                continue
            group = quant_groups.setdefault(weight_name, {})
            group[suffix] = read_rows(file, stored)
            leaf = _quantized_leaf(group, weight_name, dtype)
            if leaf is not None:
                if tuple(leaf.shape) != spec.layer_shape:
                    raise CheckpointError(f"{str(file)!r}: quantized {weight_name!r} has shape "
                                          f"{list(leaf.shape)}, expected {list(spec.layer_shape)}")
                del quant_groups[weight_name]
                place(weight_name, file, spec, layer, leaf)
            continue
        spec, layer = lookup(name, file)
        if spec is None:
            continue
        if file_dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} has dtype {file_dtype}, expected "
                                  f"one of {sorted(FLOAT_DTYPES)}; quantized checkpoints other "
                                  f"than bitsandbytes 4-bit / 8-bit are not supported")
        if shape != spec.layer_shape:
            raise CheckpointError(f"{str(file)!r}: tensor {name!r} has shape {list(shape)}, "
                                  f"expected {list(spec.layer_shape)} from config.json")
        itemsize = jnp.dtype(FLOAT_DTYPES[file_dtype]).itemsize
        if spec.stacked:
            array = read_whole(file, stored, shape, itemsize, chunk_bytes)
            if quantize is not None and is_projection(spec):
                leaf = quantize_weight(array, quantize, dtype=np_dtype.name)
            else:
                leaf = array.astype(np_dtype, copy=False)
            del array
        else:
            leaf = _unstacked(file, stored, shape, itemsize, np_dtype, chunk_bytes)
        place(name, file, spec, layer, leaf)
        del leaf
    if quant_groups:
        name, group = next(iter(quant_groups.items()))
        raise CheckpointError(f"{str(folder)!r}: quantized weight {name!r} is incomplete (found "
                              f"parts {sorted(group)}); the checkpoint is truncated or not a "
                              f"bitsandbytes nf4 / int8 checkpoint")
    missing = []  # HF names of the tensors the config needs and the files did not hold
    for path, spec in specs.items():
        if not spec.stacked:
            missing += [] if path in filled else [path_to_hf(path, None)]
        elif filled.get(path, 0) != config.num_layers:
            seen = pending[path][1] if path in pending else [False] * config.num_layers
            missing += [path_to_hf(path, layer) for layer, ok in enumerate(seen) if not ok]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise CheckpointError(f"{str(folder)!r}: the checkpoint lacks {len(missing)} tensor(s) "
                              f"that config.json needs: {shown}{more}; the download is "
                              f"incomplete or config.json describes another model")
    return params


def _unstacked(file: pathlib.Path, name: str, shape: tuple[int, ...], itemsize: int,
               dtype: np.dtype, chunk_bytes: int) -> jax.Array:
    """Unstacked tensor `name` [*shape] cast to `dtype` on the device, in row chunks if large."""
    chunks = row_chunks(shape, itemsize, chunk_bytes)
    if len(chunks) == 1:
        return jax.device_put(read_rows(file, name).astype(dtype, copy=False))
    buffer = device_zeros(shape, dtype)
    for start, stop in chunks:
        rows = read_rows(file, name, start, stop).astype(dtype, copy=False)
        buffer = write_rows(buffer, rows, start)
        del rows
    return buffer


def load_checkpoint(folder: str | pathlib.Path, *, dtype: Any = jnp.float32,
                    quantize: QuantKind | None = None,
                    chunk_bytes: int = CHUNK_BYTES) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) of a checkpoint folder; `quantize` and `chunk_bytes` as in
    `load_params`."""
    config, _ = read_config(folder)
    return config, load_params(folder, config, dtype=dtype, quantize=quantize,
                               chunk_bytes=chunk_bytes)


__all__ = ["load_checkpoint", "load_params", "read_config", "CheckpointError", "ConfigError"]
