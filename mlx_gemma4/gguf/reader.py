"""GGUF file parsing: the header (metadata + tensor table) and the memory-mapped tensor data.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds one numpy view per array
element and takes ~19 s on the 262,144-token Gemma vocabulary; this parser takes well under a second.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import CheckpointError
from ..limits import check_gguf_alignment
from .dequantize import dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (ggml's `ne` reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type id {self.ggml_type}"


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: np.ndarray = field(repr=False)  # the whole file, uint8, memory-mapped

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def raw(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self.buffer[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """The named tensor dequantized to float32, in numpy order."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape, name=name)


_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class _HeaderReader:
    """Sequential little-endian reads over the file's bytes; running past the end is a truncated file."""

    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.data):
            raise ValueError(
                f"{self.path}: truncated GGUF file: reading {what} needs bytes up to {self.pos + n}, "
                f"but the file has only {len(self.data)} bytes"
            )

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype == GGUFValueType.STRING:
                return [self.string(what) for _ in range(count)]
            if etype in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[etype])
                self._need(count * dtype.itemsize, what)
                arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            if etype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY, what) for _ in range(count)]
            raise ValueError(f"{self.path}: {what} is an array of unknown GGUF value type {etype}")
        if vtype == GGUFValueType.FLOAT32:  # shortest decimal that round-trips the float32: 1e-06, not 9.99e-07
            return float(str(np.float32(self.scalar("<f", what))))
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        raise ValueError(f"{self.path}: {what} has unknown GGUF value type {vtype}")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header (metadata + tensor table) and memory-map its data; validates sizes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path}: truncated GGUF file ({size} bytes; the fixed header alone is 24 bytes)")
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buffer = np.frombuffer(mapped, dtype=np.uint8)
    reader = _HeaderReader(memoryview(mapped), path)

    magic = bytes(reader.data[:4])
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
    reader.pos = 4
    version = reader.scalar("<I", "the version")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = reader.scalar("<Q", "the tensor count")
    n_kv = reader.scalar("<Q", "the metadata count")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string("a metadata key")
        vtype = reader.scalar("<I", f"the type of {key}")
        try:
            metadata[key] = reader.value(vtype, f"metadata {key!r}")
        except RecursionError:
            raise CheckpointError(f"{path}: metadata {key!r} is an array nested too deeply") from None

    entries = []
    for _ in range(n_tensors):
        name = reader.string("a tensor name")
        n_dims = reader.scalar("<I", f"tensor {name!r}")
        if n_dims > 4:  # GGML_MAX_DIMS
            raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGUF tensors have at most 4)")
        ne = [reader.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        ggml_type = reader.scalar("<I", f"tensor {name!r}")
        offset = reader.scalar("<Q", f"tensor {name!r}")
        entries.append((name, ne, ggml_type, offset))

    alignment = check_gguf_alignment(metadata.get("general.alignment", DEFAULT_ALIGNMENT), path)
    data_start = -(-reader.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, ggml_type, offset in entries:
        nbytes = _tensor_nbytes(name, ne, ggml_type, path)
        info = TensorInfo(name, tuple(int(d) for d in reversed(ne)), ggml_type, data_start + offset, nbytes)
        if info.offset + nbytes > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name!r} ({info.type_name}, shape {info.shape}) needs "
                f"bytes up to {info.offset + nbytes}, but the file has only {size} bytes"
            )
        tensors[name] = info
    return GGUFFile(path, version, metadata, tensors, buffer)


def _tensor_nbytes(name: str, ne: list[int], ggml_type: int, path: Path) -> int:
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(
            f"{path}: tensor {name!r} uses unsupported GGML quantization type id {ggml_type} "
            f"(this importer knows: {', '.join(t.name for t in GGML_QUANT_SIZES)})"
        ) from None
    if ne and ne[0] % block:
        raise ValueError(f"{path}: tensor {name!r}: row length {ne[0]} is not a multiple of {qtype.name}'s "
                         f"block size {block}")
    n = math.prod(int(d) for d in ne)  # Python ints: a crafted shape cannot overflow into a small size
    return n // block * type_size
