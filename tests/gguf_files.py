"""Write small GGUF files with the `gguf` package's own writer, for import tests.

`write_gguf` lays a model out as llama.cpp's converter does, through the export's tables
(converters/gguf_names.py: names, layouts, metadata, rope tensors), storing every tensor of two
or more dimensions as `qtype` (norms and biases stay F32, as llama.cpp keeps them). `extra_kv`,
`arch` and `tensors` let tests write what a broken or foreign file would hold.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from fastlora_jax.config import ModelConfig
from fastlora_jax.converters import gguf_names as gn
from fastlora_jax.models.decoder import Params, get_path, param_specs

# A byte-level BPE vocabulary of 64 tokens ("Ġ" is the space byte) with one merge, a <s>/</s>
# pair of control tokens and a chat template: enough for transformers' GGUF converter.
TOKENS = (["<s>", "</s>", "Ġ", "ab"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
          + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(8)])
TOKEN_TYPES = [3, 3] + [1] * (len(TOKENS) - 2)  # 3 = control, 1 = normal
MERGES = ["a b"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"


def gguf_tensors(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """{GGUF name: float32 array in GGUF layout} of every parameter, plus the rope tensors."""
    out = dict(gn.rope_tensors(config))
    for spec in param_specs(config):
        value = np.asarray(get_path(params, spec.path), np.float32)
        for layer in range(config.num_layers) if spec.stacked else (None,):
            array = value[layer] if spec.stacked else value
            out[gn.gguf_tensor_name(config, spec.path, layer)] = gn.to_gguf_layout(
                config, spec.path, array)
    return out


def write_gguf(path: pathlib.Path, config: ModelConfig, params: Params, *, qtype: str = "F32",
               arch: str | None = None, extra_kv: dict[str, Any] | None = None,
               tensors: dict[str, np.ndarray] | None = None, tokenizer: bool = True,
               raw: dict[str, tuple[np.ndarray, str]] | None = None) -> pathlib.Path:
    """Write `config` / `params` as a GGUF at `path` (see module doc).

    `tensors` replaces the model's tensors (GGUF names -> float32 arrays); `raw` adds tensors
    given as (uint8 block bytes, GGML type name).
    """
    import gguf

    arch = arch or gn.gguf_arch(config)
    writer = gguf.GGUFWriter(str(path), arch)
    metadata = {f"{arch}.{k.split('.', 1)[1]}": v for k, v in gn.to_gguf_metadata(config).items()}
    metadata.update(extra_kv or {})
    for key, value in metadata.items():
        if isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[gn.metadata_type(value)])
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(TOKENS)
        writer.add_token_types(TOKEN_TYPES)
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_chat_template(CHAT_TEMPLATE)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, array in (gguf_tensors(config, params) if tensors is None else tensors).items():
        if array.ndim < 2 or kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array), kind),
                              raw_dtype=kind)
    for name, (blocks, type_name) in (raw or {}).items():
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_params(config: ModelConfig, seed: int = 0) -> Params:
    """Random float32 parameters with non-trivial norms (Gemma's start at 0 = identity)."""
    from fastlora_jax.models.decoder import init_params

    params = init_params(config, jax.random.key(seed))
    noise = jax.random.key(seed + 1)
    return jax.tree.map(lambda a: np.asarray(a + 0.1 * jax.random.normal(noise, a.shape),
                                             np.float32), params)
