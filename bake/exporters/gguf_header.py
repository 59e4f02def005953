"""A GGUF file's header, fast: its scalar metadata and its tensor table (name, ggml type), without the
tensor data and without building the metadata arrays.

gguf-py's `GGUFReader` parses every metadata value into numpy views, one per array element: on a GGUF
holding a 49,152-token vocabulary and its merges that is about 4 s per open (262,144 tokens for
Gemma-3: several times more), and bake reads the header of each GGUF it writes or verifies several
times. This reader walks the same layout (GGUF v2/v3: magic, version, tensor count, key-value count;
each key-value as key, type, value; then each tensor as name, dimensions, type, offset; little-endian)
and skips arrays by their lengths. Values of array type come back as None; `gguf.GGUFReader` remains
the reader where the arrays are needed (carrying a source GGUF's vocabulary over)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import BakeError

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    fields: dict[str, object]  # scalars and strings; arrays as None
    tensors: list[tuple[str, str]]  # (name, ggml type name) in file order


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = bytes(self.buf[self.at:self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALAR:
                self.at += struct.calcsize(_SCALAR[etype]) * count
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def read(path: Path) -> Header:
    """The header of the GGUF file `path`; a BakeError naming the file where it is not one."""
    import mmap

    from gguf import GGMLQuantizationType

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            c = _Cursor(memoryview(mm))
            try:
                if bytes(c.buf[:4]) != b"GGUF":
                    raise ValueError("no GGUF magic")
                c.at = 4
                c.take("<I")
                n_tensors, n_kv = c.take("<Q"), c.take("<Q")
                fields = {}
                for _ in range(n_kv):
                    key = c.string()
                    fields[key] = c.value(c.take("<I"))
                tensors = []
                for _ in range(n_tensors):
                    name = c.string()
                    n_dims = c.take("<I")
                    c.at += 8 * n_dims  # the dimensions
                    tensors.append((name, GGMLQuantizationType(c.take("<I")).name))
                    c.take("<Q")  # offset
            finally:
                c.buf.release()
    except (OSError, ValueError, struct.error) as e:
        raise BakeError(f"{Path(path).name}: not a readable GGUF file ({e})") from None
    return Header(fields, tensors)
