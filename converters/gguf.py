"""GGUF export: the model (adapters merged) as one llama.cpp / Ollama file, or the adapter alone.

`save_gguf` writes `<folder>/model.<METHOD>.gguf` and an Ollama `Modelfile`; `save_gguf_lora`
writes `<folder>/adapter.gguf`, a LoRA that llama.cpp applies on top of the base model's GGUF. Both
write into a temporary folder that is renamed into place when complete (`atomic_folder`), so a
failed export leaves nothing behind.

The model streams one tensor at a time: the writer first records every tensor's name, type and
byte size (all known from the config), writes header and metadata, then for each tensor
dequantizes the frozen weight if it is NF4 / int8, folds in that layer's adapter in float32
(`merge_weight`), moves it to llama.cpp's layout (`gguf_names.to_gguf_layout`), encodes it
(`gguf_quants.encode`) and appends it, so memory holds about one tensor beyond the model itself.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Iterator

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters import gguf_names, gguf_quants
from fastlora_jax.converters.atomic import atomic_folder
from fastlora_jax.converters.gguf_vocab import add_tokenizer
from fastlora_jax.converters.gguf_writer import GGUFWriter
from fastlora_jax.converters.ollama import MODELFILE_NAME, modelfile
from fastlora_jax.errors import ExportError
from fastlora_jax.lora.layer import dense, merge_weight
from fastlora_jax.lora.spec import LoraSpec
from fastlora_jax.models.decoder import Params, get_path, param_specs

ADAPTER_NAME = "adapter.gguf"


def gguf_file_name(quantization_method: str) -> str:
    """`model.Q4_K_M.gguf` for `q4_k_m` (llama.cpp's spelling of the type in file names)."""
    return f"model.{quantization_method.upper()}.gguf"


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: GGUF name, HF-layout shape, GGUF type and how to compute it."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    value: Callable[[], np.ndarray | jax.Array]


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...],
                                                                               int, Any]:
    """(array shape, bytes, numpy dtype) of `shape` encoded as `qtype`."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, 4 * int(np.prod(shape)), np.float32
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, 2 * int(np.prod(shape)), np.float16
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, int(np.prod(byte_shape)), np.uint8


def _lora_entry(lora: Params | None, spec: LoraSpec | None, path: tuple[str, ...],
                layer: int | None) -> tuple[Params, int, float] | None:
    """The stacked adapter arrays of weight `path`, this layer's rank and scale, or None if the
    layer has no adapter there."""
    if lora is None or spec is None or layer is None or path[-1] != "weight" or len(path) != 4:
        return None
    module = (path[1], path[2])
    if module not in spec.targets:
        return None
    ranks, scales = spec.entry(module)
    if ranks[layer] == 0:
        return None
    return lora["layers"][path[1]][path[2]], ranks[layer], scales[layer]


@functools.partial(jax.jit, static_argnames=("config", "path", "rank"))
def _merged_value(w: Any, layer: jax.Array | None, adapter: Params | None, scale: jax.Array,
                  *, config: ModelConfig, path: tuple[str, ...], rank: int) -> jax.Array:
    """One tensor as the file stores it, in float32 on w's device: layer `layer` of the stacked
    w (or w itself when layer is None), dequantized, its adapter folded in, in GGUF layout. One
    compiled call per tensor: eager slicing, merging and permuting were several device ops each."""
    def take(a: jax.Array) -> jax.Array:
        return a if layer is None else jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)

    w = jax.tree.map(take, w)
    if adapter is None:
        merged = dense(w)
    else:
        entry = {"lora_A": take(adapter["lora_A"])[:rank],
                 "lora_B": take(adapter["lora_B"])[:, :rank]}
        if "lora_magnitude" in adapter:
            entry["lora_magnitude"] = take(adapter["lora_magnitude"])
        merged = merge_weight(w, entry, scale)
    return gguf_names.to_gguf_layout(config, path, merged.astype(jnp.float32))


def _model_tensors(config: ModelConfig, frozen: Params, lora: Params | None,
                   spec: LoraSpec | None, method: str, arch: str) -> list[_Tensor]:
    """Every tensor of the merged model in file order: rope tensors, embedding, blocks, output."""
    tied = config.tie_embeddings
    out = [_Tensor(name, value.shape, gguf.GGMLQuantizationType.F32, lambda v=value: v)
           for name, value in gguf_names.rope_tensors(config).items()]
    specs = param_specs(config)

    def make(path: tuple[str, ...], layer: int | None, shape: tuple[int, ...]) -> _Tensor:
        name = gguf_names.gguf_tensor_name(config, path, layer)

        def value() -> jax.Array:
            lora_entry = _lora_entry(lora, spec, path, layer)
            adapter, rank, scale = lora_entry if lora_entry else (None, 0, 0.0)
            # stays on the device: the quantizers run there
            return _merged_value(get_path(frozen, path), None if layer is None else np.int32(layer),
                                 adapter, np.float32(scale), config=config, path=path, rank=rank)

        qtype = gguf_quants.tensor_type(method, name, shape, n_layers=config.num_layers,
                                        tied=tied, arch=arch)
        return _Tensor(name, shape, qtype, value)

    top = [s for s in specs if not s.stacked]
    out += [make(s.path, None, s.shape) for s in top if s.path[0] == "embed_tokens"]
    for layer in range(config.num_layers):
        out += [make(s.path, layer, s.layer_shape) for s in specs if s.stacked]
    out += [make(s.path, None, s.shape) for s in top if s.path[0] != "embed_tokens"]
    return out


def _write(path: pathlib.Path, writer: gguf.GGUFWriter, tensors: list[_Tensor],
           show_progress: bool, label: str) -> None:
    """Declare every tensor, write header + metadata + tensor infos, then stream the data."""
    shapes = {}
    for t in tensors:
        array_shape, nbytes, dtype = _nbytes(t.shape, t.qtype)
        shapes[t.name] = array_shape
        writer.add_tensor_info(t.name, array_shape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in _progress(tensors, show_progress, label):
        data = gguf_quants.encode(t.value(), t.qtype)
        if data.shape != shapes[t.name]:
            raise ExportError(f"internal error: {t.name} encoded to {data.shape}, declared "
                              f"{shapes[t.name]}")
        writer.write_tensor_data(data)
    writer.close()


def _progress(tensors: list[_Tensor], show: bool, label: str) -> Iterator[_Tensor]:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[tensor]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show, transient=True) as progress:
        task = progress.add_task(label, total=len(tensors), tensor="")
        for t in tensors:
            progress.update(task, tensor=f"{t.name} {t.qtype.name}")
            yield t
            progress.advance(task)


def _add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, name: str) -> None:
    writer.add_name(name)
    for key, value in gguf_names.to_gguf_metadata(config).items():
        kind = gguf_names.metadata_type(value)
        if kind == "ARRAY":
            writer.add_array(key, list(value))
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[kind])


def save_gguf(folder: str | pathlib.Path, config: ModelConfig, frozen: Params, tokenizer: Any,
              *, lora: Params | None = None, lora_spec: LoraSpec | None = None,
              quantization_method: str = "q8_0", name: str | None = None,
              overwrite: bool = False, show_progress: bool = True) -> pathlib.Path:
    """Write the model (adapters merged in float32) as `<folder>/model.<METHOD>.gguf` plus an
    Ollama Modelfile; returns the GGUF file's path."""
    method_name = str(quantization_method).lower()
    method = gguf_quants.method(method_name)
    arch = gguf_names.check_exportable(config)
    if tokenizer is None:
        raise ExportError("a GGUF file carries its tokenizer: pass the model's tokenizer "
                          "(save_pretrained_gguf(folder, tokenizer, ...))")
    folder = pathlib.Path(folder)
    file_name = gguf_file_name(method_name)
    tensors = _model_tensors(config, frozen, lora, lora_spec, method_name, arch)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        writer = GGUFWriter(None, arch)
        _add_metadata(writer, config, name or folder.name)
        writer.add_file_type(method.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        _write(tmp / file_name, writer, tensors, show_progress, f"gguf {method_name}")
        (tmp / MODELFILE_NAME).write_text(modelfile(file_name, tokenizer))
    return folder / file_name


def save_gguf_lora(folder: str | pathlib.Path, config: ModelConfig, lora: Params | None,
                   lora_spec: LoraSpec | None, *, overwrite: bool = False,
                   show_progress: bool = True) -> pathlib.Path:
    """Write the adapter as a llama.cpp LoRA GGUF, `<folder>/adapter.gguf` (float32 factors).

    llama.cpp scales every pair by `alpha / rank` with one alpha per file; per-module scales
    (rsLoRA, rank_pattern, alpha_pattern) are folded into B so that B' A * alpha / r equals
    our s B A exactly. DoRA has no llama.cpp form and is refused.
    """
    if lora is None or lora_spec is None:
        raise ExportError("the model has no adapter to export; call "
                          "FastLanguageModel.get_peft_model(model, ...) first, or export the "
                          "merged model with save_method='merged'")
    if lora_spec.config.use_dora:
        raise ExportError("DoRA adapters have no llama.cpp LoRA form (llama.cpp applies plain "
                          "B A); export the merged model instead")
    arch = gguf_names.check_exportable(config)
    alpha = float(lora_spec.config.lora_alpha)
    tensors: list[_Tensor] = []
    for (group, module), ranks, scales in lora_spec.modules:
        path = ("layers", group, module, "weight")
        arrays = lora["layers"][group][module]
        for layer, (r, s) in enumerate(zip(ranks, scales)):
            if r == 0:
                continue
            name_a, name_b = gguf_names.lora_tensor_names(config, path, layer)
            a = arrays["lora_A"][layer, :r]
            b = arrays["lora_B"][layer, :, :r]
            fold = np.float32(s * r / alpha)
            tensors.append(_Tensor(name_a, tuple(a.shape), gguf.GGMLQuantizationType.F32,
                                   lambda a=a: np.asarray(a, np.float32)))
            tensors.append(_Tensor(
                name_b, tuple(b.shape), gguf.GGMLQuantizationType.F32,
                lambda b=b, fold=fold, path=path: gguf_names.to_gguf_layout(
                    config, path, np.asarray(b, np.float32) * fold)))
    folder = pathlib.Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        writer = GGUFWriter(None, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        _write(tmp / ADAPTER_NAME, writer, tensors, show_progress, "gguf lora")
    return folder / ADAPTER_NAME


__all__ = ["ADAPTER_NAME", "gguf_file_name", "save_gguf", "save_gguf_lora"]
