"""`gguf.GGUFWriter` with its metadata arrays packed in one go.

The package packs every array element with its own `struct.pack` call and type check; a 49K-token
vocabulary, its token types and 48K merges took most of a second of a small model's export. Plain
lists of one Python type (str, int, float: the tokenizer arrays) are packed here with bulk
operations into the same bytes; everything else goes through the package unchanged.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

V = gguf.GGUFValueType
_ELEMENT = {str: V.STRING, int: V.INT32, float: V.FLOAT32}
_NUMPY = {V.INT32: "i4", V.FLOAT32: "f4"}


class GGUFWriter(gguf.GGUFWriter):
    """The package's writer; only homogeneous str / int / float list values pack faster."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        kind = type(val[0]) if vtype == V.ARRAY and isinstance(val, list) and val else None
        if sub_type is not None or kind not in _ELEMENT or not all(type(v) is kind for v in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        element = _ELEMENT[kind]
        head = np.array([V.ARRAY] if add_vtype else [], f"{order}u4").tobytes() + np.array(
            [element], f"{order}u4").tobytes() + np.array([len(val)], f"{order}u8").tobytes()
        if element != V.STRING:
            return head + np.asarray(val, f"{order}{_NUMPY[element]}").tobytes()
        byteorder = "little" if order == "<" else "big"
        encoded = [s.encode("utf-8") for s in val]
        return head + b"".join([part for e in encoded
                                for part in (len(e).to_bytes(8, byteorder), e)])


__all__ = ["GGUFWriter"]
