"""One tensor out of a GGUF file without reading the rest of its header into Python objects.

gguf's GGUFReader builds numpy views of every metadata field: for a Llama 3 vocabulary (128k tokens, 280k
merges) that took 17 s, longer than loading the weights. Walking the header with offsets (the lengths of
strings and arrays are all it needs) finds a tensor in a fraction of a second.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

MAGIC = b"GGUF"
F32 = 0  # the GGML tensor type of a float32 tensor
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size value types
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _skip_value(mm, pos: int, kind: int) -> int:
    if kind in _SIZES:
        return pos + _SIZES[kind]
    if kind == _STRING:
        return pos + 8 + struct.unpack_from("<Q", mm, pos)[0]
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        if item in _SIZES:
            return pos + count * _SIZES[item]
        for _ in range(count):
            pos = _skip_value(mm, pos, item)
        return pos
    raise ValueError(f"unknown GGUF value type {kind}")


def _string(mm, pos: int) -> tuple[str, int]:
    n = struct.unpack_from("<Q", mm, pos)[0]
    return mm[pos + 8 : pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n


def read_f32_tensor(path: Path, name: str):
    """The float32 tensor `name` of a GGUF (version 2 or 3) file as a flat numpy array, or None if it has none."""
    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != MAGIC or struct.unpack_from("<I", mm, 4)[0] not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        tensors, fields = struct.unpack_from("<QQ", mm, 8)
        pos, alignment = 24, 32
        for _ in range(fields):
            key, pos = _string(mm, pos)
            kind = struct.unpack_from("<I", mm, pos)[0]
            if key == "general.alignment" and kind == _UINT32:
                alignment = struct.unpack_from("<I", mm, pos + 4)[0]
            pos = _skip_value(mm, pos + 4, kind)
        found = None
        for _ in range(tensors):
            tensor, pos = _string(mm, pos)
            dims = struct.unpack_from("<I", mm, pos)[0]
            shape = struct.unpack_from(f"<{dims}Q", mm, pos + 4)
            kind, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * dims)
            pos += 4 + 8 * dims + 12
            if tensor == name:
                if kind != F32:
                    raise ValueError(f"{path}: {name} is GGML type {kind}, not float32")
                found = (int(np.prod(shape)), offset)
        if found is None:
            return None
        data_start = (pos + alignment - 1) // alignment * alignment
        count, offset = found
        return np.frombuffer(mm, dtype=np.float32, count=count, offset=data_start + offset).copy()
