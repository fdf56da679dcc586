"""Open a GGUF file (llama.cpp's format) and read its metadata and tensors, without torch.

The `gguf` package parses the file (`GGUFReader`, memory-mapped) and dequantizes its blocks
(`gguf.quants.dequantize`, numpy); this module adds what a loader needs on top of it: one clear
error for a file that is not GGUF, is truncated, or holds a tensor type we do not read; metadata
values as plain Python; and tensors dequantized to float32 in row chunks, so that a large
quantized embedding never sits on the host whole in float32 at once.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from fastlora_jax.errors import CheckpointError

GGUF_SUFFIX = ".gguf"
MAGIC = b"GGUF"


def _supported_types() -> frozenset[Any]:
    from gguf import GGMLQuantizationType as T

    return frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K,
                      T.Q4_K, T.Q5_K, T.Q6_K})


class GGUFFile:
    """One GGUF file: `arch`, metadata by key (`value`, `keys`), tensors by name (`dequantize`).

    Opening checks the magic, parses the header, and checks that every tensor has a type we
    dequantize; any failure is a `CheckpointError` naming the file and what to do.
    """

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.reader = _open_reader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        supported = _supported_types()
        for tensor in self.reader.tensors:
            if tensor.tensor_type not in supported:
                raise CheckpointError(
                    f"{str(self.path)!r}: tensor {tensor.name!r} is stored as "
                    f"{tensor.tensor_type.name}, which fastlora_jax does not read; supported "
                    f"GGUF tensor types: {sorted(t.name for t in supported)}. Re-quantize the "
                    f"model to one of them (llama.cpp's llama-quantize, e.g. Q4_K_M or Q8_0)")
        self.arch = self.value("general.architecture", None)
        if not isinstance(self.arch, str):
            raise CheckpointError(f"{str(self.path)!r} has no 'general.architecture' string; it is "
                                  f"not a model GGUF (re-export it with llama.cpp's converter)")

    def keys(self) -> list[str]:
        """Every metadata key, in file order (the reader's own `GGUF.*` header fields excluded)."""
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def value(self, key: str, default: Any = ...) -> Any:
        """Metadata `key` as Python (str, int, float, bool, or a list of them); `default` when it
        is absent (no default: a CheckpointError naming the key). A float32 scalar comes back
        as the shortest decimal that rounds to it."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{str(self.path)!r}: GGUF metadata key {key!r} is missing; "
                                      f"the file is incomplete — re-export it")
            return default
        import gguf

        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # the shortest decimal that is this float32 (1e-06, not 9.99999997e-07): what the
            # writer meant, and what config.json would say
            return float(str(np.float32(value)))
        if isinstance(value, np.generic):
            value = value.item()
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape in numpy order (row-major: [out, in] for a linear weight)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantize(self, name: str, start: int | None = None,
                   stop: int | None = None) -> np.ndarray:
        """Tensor `name` (rows [start, stop) of its first axis when given) as float32 numpy."""
        import gguf

        tensor = self.tensors[name]
        data = tensor.data if start is None else tensor.data[start:stop]
        try:
            out = gguf.quants.dequantize(np.asarray(data), tensor.tensor_type)
        except (ValueError, IndexError) as err:
            raise CheckpointError(f"{str(self.path)!r}: tensor {name!r} "
                                  f"({tensor.tensor_type.name}) could not be dequantized ({err}); "
                                  f"the file is corrupt — re-download or re-export it") from None
        return np.asarray(out, dtype=np.float32)


def _open_reader(path: pathlib.Path) -> Any:
    """A GGUFReader over `path`, or one CheckpointError saying what is wrong with the file."""
    import gguf

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r} ({err.strerror}); check the path and "
                              f"its permissions") from None
    if head != MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (it starts with {head!r}, not "
                              f"{MAGIC!r}); pass a .gguf model file, or a folder holding "
                              f"config.json and *.safetensors")
    try:
        return gguf.GGUFReader(path)
    except ValueError as err:
        if "GGMLQuantizationType" in str(err):
            raise CheckpointError(
                f"{str(path)!r} holds a tensor of an unknown GGML type ({err}); it was written "
                f"by a newer llama.cpp than the gguf package knows, or is corrupt. Re-quantize "
                f"the model to a standard type (e.g. Q8_0 or Q4_K_M)") from None
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file ({err}); it is "
                              f"truncated or corrupt — re-download or re-export it") from None
    except (IndexError, OverflowError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file "
                              f"({type(err).__name__}: {err}); it is truncated or corrupt — "
                              f"re-download or re-export it") from None


def find_gguf(path: pathlib.Path, gguf_file: str | None = None) -> pathlib.Path | None:
    """The GGUF file that `path` names, or None when `path` is not a GGUF model.

    `path` may be the .gguf file itself, or a folder: with `gguf_file` (a file name inside it, as
    in transformers' `from_pretrained(folder, gguf_file=...)`), or holding exactly one .gguf and
    no config.json (a folder with config.json is a Hugging Face checkpoint).
    """
    if gguf_file is not None:
        file = path / gguf_file if path.is_dir() else path.parent / gguf_file
        if not file.is_file():
            raise CheckpointError(f"gguf_file={gguf_file!r} is not a file in {str(file.parent)!r}"
                                  f"; pass the name of a .gguf file there")
        return file
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*" + GGUF_SUFFIX))
    if len(found) > 1:
        raise CheckpointError(f"{str(path)!r} holds several GGUF files "
                              f"({[f.name for f in found]}); pass one of them "
                              f"(the file path, or gguf_file=NAME)")
    return found[0] if found else None
