"""Load a GGUF model's weights into our parameter tree (dequantized, then cast or quantized).

Names: the `gguf` package's own table (`gguf.get_tensor_name_map`, the one llama.cpp's converter
uses) maps each of our parameters' HF names to its GGUF name for the file's architecture, so the
table is read in the direction llama.cpp wrote it. Values: two transforms undo what llama.cpp's
converter does to HF tensors —
- arch `llama`: q and k rows (weights and biases) are permuted so that each head's rotary pairs are
  adjacent (llama.cpp rotates neighbouring elements, HF the two halves of a head); undone here;
- Gemma 1/2/3: every RMSNorm weight is stored as `1 + w` (the multiplier llama.cpp applies);
  `w` is what the HF checkpoint and our decoder (`norm_offset = 1`) keep.
Everything else is stored as HF has it (Phi-3's qkv_proj / gate_up_proj stay fused).

Each tensor is dequantized to float32 and handed to `convert` (a cast by default, or the
load_in_4bit / load_in_8bit quantizer), one layer of one parameter at a time; the unstacked ones
(embeddings, lm_head, final norm) in row chunks of at most `chunk_bytes` of float32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters.chunks import CHUNK_BYTES, device_zeros, row_chunks, write_rows
from fastlora_jax.converters.gguf_config import ROPE_TENSORS, hf_config_from_gguf
from fastlora_jax.converters.gguf_read import GGUFFile
from fastlora_jax.converters.hf import Convert
from fastlora_jax.converters.names import path_to_hf
from fastlora_jax.errors import CheckpointError, ConfigError
from fastlora_jax.models.decoder import ParamSpec, Params, param_specs, set_path

GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def read_gguf_config(g: GGUFFile) -> ModelConfig:
    """The ModelConfig of the model in `g` (strict; see converters/gguf_config.py)."""
    return ModelConfig.from_hf_config(hf_config_from_gguf(g),
                                      source=f"{str(g.path)!r} (GGUF metadata)")


def gguf_names(arch: str, config: ModelConfig) -> dict[tuple[tuple[str, ...], int | None], str]:
    """{(parameter path, layer or None): GGUF tensor name} for every parameter of `config`."""
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    table = gguf.get_tensor_name_map(arch_ids[arch], config.num_layers)
    out = {}
    for spec in param_specs(config):
        for layer in range(config.num_layers) if spec.stacked else (None,):
            hf_name = path_to_hf(spec.path, layer)
            name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConfigError(f"the gguf package has no {arch!r} tensor name for {hf_name!r}")
            out[(spec.path, layer)] = name
    return out


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows [heads, 2, D/2] (pairs adjacent) back to
    [heads, D/2, 2] order... i.e. each head's rows (0, D/2, 1, D/2+1, ...) back to (0, 1, ...)."""
    rows = w.shape[0]
    return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def value_transform(arch: str, config: ModelConfig,
                    name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The inverse of llama.cpp's converter transform for GGUF tensor `name`, or None."""
    if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = config.num_heads if name.split(".")[-2] == "attn_q" else config.num_kv_heads
        return lambda w: unpermute_rows(w, heads)
    if arch in GEMMA_ARCHS and name.endswith("norm.weight"):
        return lambda w: w - np.float32(1.0)
    return None


def load_gguf_params(g: GGUFFile, config: ModelConfig, *, dtype: Any,
                     convert: Convert | None = None, chunk_bytes: int = CHUNK_BYTES) -> Params:
    """Every parameter of `config` from `g`, dequantized and converted (see module doc).

    Every tensor of the file must be used (rope tensors are read into the config), and every
    parameter found, with the shape the config implies.
    """
    np_dtype = jnp.dtype(dtype)
    convert = convert or (lambda spec, a: a.astype(np_dtype, copy=False))
    names = gguf_names(g.arch, config)
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
    array = g.dequantize(name, start, stop)
    transform = value_transform(g.arch, config, name)
    return transform(array) if transform is not None else array


def _stacked(g: GGUFFile, config: ModelConfig, spec: ParamSpec,
             names: dict[tuple[tuple[str, ...], int | None], str], convert: Convert,
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
