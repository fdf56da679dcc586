"""Load a GGUF model's weights into our parameter tree (dequantized, then cast or quantized).

Names and value layouts are the export's tables read backwards (converters/gguf_names.py): each
parameter's GGUF name is `gguf_tensor_name`, and `from_gguf_layout` undoes what llama.cpp's
converter does to HF tensors (the llama-arch q/k row permutation; Gemma's `1 + w` norms).

Each tensor is dequantized to float32 by the `gguf` package and then cast to `dtype`, or, with
`quantize`, quantized like a safetensors checkpoint's decoder projections (`models.decoder.
is_projection`, `fastlora_jax.quant.quantize`), one layer of one parameter at a time; the
unstacked ones (embeddings, lm_head, final norm) in row chunks of at most `chunk_bytes` of
float32, so a quantized vocabulary matrix never sits on the host whole in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters.chunks import CHUNK_BYTES, device_zeros, row_chunks, write_rows
from fastlora_jax.converters.gguf_config import ROPE_TENSORS
from fastlora_jax.converters.gguf_names import from_gguf_layout, gguf_tensor_name
from fastlora_jax.converters.gguf_read import GGUFFile
from fastlora_jax.errors import CheckpointError
from fastlora_jax.models.decoder import ParamSpec, Params, is_projection, param_specs, set_path
from fastlora_jax.quant import QuantKind, quantize as quantize_weight

Names = dict[tuple[tuple[str, ...], int | None], str]
# (parameter spec, float32 array of one layer or row chunk) -> what the tree keeps
Convert = Callable[[ParamSpec, np.ndarray], Any]


def gguf_names(config: ModelConfig) -> Names:
    """{(parameter path, layer or None): GGUF tensor name} for every parameter of `config`."""
    return {(spec.path, layer): gguf_tensor_name(config, spec.path, layer)
            for spec in param_specs(config)
            for layer in (range(config.num_layers) if spec.stacked else (None,))}


def load_gguf_params(g: GGUFFile, config: ModelConfig, *, dtype: Any,
                     quantize: QuantKind | None = None, chunk_bytes: int = CHUNK_BYTES) -> Params:
    """Every parameter of `config` from `g`, dequantized and converted (see module doc).

    Every tensor of the file must be used (rope tensors are read into the config), and every
    parameter found, with the shape the config implies.
    """
    np_dtype = jnp.dtype(dtype)

    def convert(spec: ParamSpec, a: np.ndarray) -> Any:
        if quantize is not None and is_projection(spec):
            return quantize_weight(a, quantize, dtype=np_dtype.name)
        return a.astype(np_dtype, copy=False)

    names = gguf_names(config)
    unused = sorted(set(g.tensors) - set(names.values()) - set(ROPE_TENSORS))
    if unused:
        raise CheckpointError(f"{str(g.path)!r}: tensors {unused[:5]} are not parameters of a "
                              f"{config.model_type!r} model with this file's metadata; the file "
                              f"holds a variant fastlora_jax does not read")
    missing = sorted(n for n in names.values() if n not in g.tensors)
    if missing:
        raise CheckpointError(f"{str(g.path)!r} lacks tensors the model needs: {missing[:5]}"
                              f"{' …' if len(missing) > 5 else ''}; the file is incomplete or "
                              f"its metadata describes another model — re-export it")
    params: Params = {}
    for spec in param_specs(config):
        if spec.stacked:
            leaf = _stacked(g, config, spec, names, convert, chunk_bytes)
        else:
            leaf = _unstacked(g, config, spec, names[(spec.path, None)], convert, chunk_bytes)
        set_path(params, spec.path, leaf)
    return params


def _read(g: GGUFFile, config: ModelConfig, spec: ParamSpec, name: str,
          start: int | None = None, stop: int | None = None) -> np.ndarray:
    if g.shape(name) != spec.layer_shape:
        raise CheckpointError(f"{str(g.path)!r}: tensor {name!r} has shape {list(g.shape(name))}, "
                              f"expected {list(spec.layer_shape)} from the file's metadata")
    return from_gguf_layout(config, spec.path, g.dequantize(name, start, stop))


def _stacked(g: GGUFFile, config: ModelConfig, spec: ParamSpec,
             names: Names, convert: Convert,
             chunk_bytes: int) -> Any:
    """[L, ...] built layer by layer: in a device buffer when large, else on the host."""
    buffer = None
    for layer in range(config.num_layers):
        leaf = convert(spec, _read(g, config, spec, names[(spec.path, layer)]))
        if buffer is None:
            L = config.num_layers
            on_device = L * sum(a.nbytes for a in jax.tree.leaves(leaf)) > chunk_bytes
            new = (lambda a: device_zeros((L,) + a.shape, a.dtype)) if on_device else (
                lambda a: np.empty((L,) + a.shape, a.dtype))
            buffer = jax.tree.map(new, leaf)
        if isinstance(jax.tree.leaves(buffer)[0], jax.Array):
            buffer = jax.tree.map(lambda buf, a: write_rows(buf, a[None], layer), buffer, leaf)
        else:
            jax.tree.map(lambda buf, a: buf.__setitem__(layer, a), buffer, leaf)
        del leaf
    return jax.device_put(buffer)


def _unstacked(g: GGUFFile, config: ModelConfig, spec: ParamSpec, name: str, convert: Convert,
               chunk_bytes: int) -> Any:
    """An unstacked parameter on the device, dequantized in row chunks when large."""
    chunks = row_chunks(spec.layer_shape, 4, chunk_bytes)
    if len(chunks) == 1:
        return jax.device_put(convert(spec, _read(g, config, spec, name)))
    buffer = None
    for start, stop in chunks:
        rows = convert(spec, _read(g, config, spec, name, start, stop))
        if buffer is None:
            buffer = device_zeros(spec.layer_shape[:1] + rows.shape[1:], rows.dtype)
        buffer = write_rows(buffer, rows, start)
        del rows
    return buffer
