"""Safetensors files: header checks, the weight files of a checkpoint, shard naming, and writing shards + index.

The one place that knows the file layout (8-byte little-endian header length, JSON header of
{name: {dtype, shape, data_offsets}}, tensor bytes) and the Hugging Face sharding convention
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`). Used by loading, convert, synth and the
memory planner.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import CheckpointError, read_json

INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(file: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, checked against the file size
    (a truncated or corrupt file is one CheckpointError naming it). Reads the header only."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file.name} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file.name} is truncated: header says {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{file.name} has a corrupt safetensors header: {e}") from e
    return check_header(header, file, size - 8 - n)


MAX_TENSOR_DIMS = 8


def check_header(header, file: Path, data_bytes: int) -> dict[str, dict]:
    """A parsed header checked entry by entry: {name: {"dtype", "shape", "data_offsets"}} with a known dtype, a
    shape of non-negative integers, and offsets inside the file's `data_bytes` spanning exactly the shape's
    bytes; CheckpointError naming the file and the tensor otherwise. Returns it without `__metadata__`."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name}: the safetensors header must be a JSON object, not a "
                              f"{type(header).__name__}")
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{file.name}: tensor {key!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: its header entry must be an object, not {type(info).__name__}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r:.40}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: the shape must be a list of at most {MAX_TENSOR_DIMS} non-negative "
                                  f"integers, got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got "
                                  f"{offsets!r:.80}")
        if offsets[1] > data_bytes:
            raise CheckpointError(f"{file.name} is truncated: tensor {key!r} needs bytes up to {offsets[1]} of the "
                                  f"data, the file holds {data_bytes}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(f"{where}: shape {shape} of {dtype} is {expected} bytes, but its data_offsets span "
                                  f"{offsets[1] - offsets[0]}")
        tensors[key] = info
    return tensors


def tensor_bytes(header: dict[str, dict], keep=None) -> int:
    """Bytes of the tensors in a header (read_header) whose names pass `keep` (all when None)."""
    return sum(end - begin for name, info in header.items() if keep is None or keep(name)
               for begin, end in [info["data_offsets"]])


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (through the index when sharded), all checked to exist."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f and f not in (".", "..")
                                                       for f in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' must map tensor names "
                                  "to file names in the checkpoint directory")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"missing weight shards in {directory}: {', '.join(missing)}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {directory}")
    return files


# ---- writing ------------------------------------------------------------------------------------

def shard_file_names(n_shards: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-0000i-of-0000n.safetensors`."""
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def group_into_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names (in the given order) grouped into shards of at most max_shard_bytes (a single tensor may
    exceed it)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_shards(weights: dict, out: Path, max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write {name: mx.array} into shards of at most max_shard_bytes (one tensor may exceed it) + an index;
    returns the file names."""
    import mlx.core as mx

    names = sorted(weights)
    shards = group_into_shards([(k, weights[k].nbytes) for k in names], max_shard_bytes)
    files = shard_file_names(len(shards))
    weight_map = {}
    for file, shard in zip(files, shards):
        mx.save_safetensors(str(out / file), {k: weights[k] for k in shard}, metadata={"format": "mlx"})
        weight_map.update({k: file for k in shard})
    write_index(out, weight_map, sum(w.nbytes for w in weights.values()))
    return files


class ShardedWriter:
    """Writes a known list of tensors (name, shape, safetensors dtype) into shards whose headers are written up
    front. Each tensor is then filled in order, in slices (`write`), so nothing bigger than a slice is ever in
    memory; `close` checks every tensor is complete and writes the index."""

    def __init__(self, out: Path, entries: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int,
                 metadata: dict | None = None):
        self.out = out
        spec = {key: (tuple(shape), dtype) for key, shape, dtype in entries}
        nbytes = {key: math.prod(shape) * DTYPE_BYTES[dtype] for key, (shape, dtype) in spec.items()}
        shards = group_into_shards([(key, nbytes[key]) for key, _, _ in entries], max_shard_bytes)
        self.files = shard_file_names(len(shards))
        self.location: dict[str, tuple[int, int, int]] = {}  # key -> (shard, begin, end) in file bytes
        self.total = 0
        for shard_index, (fname, keys) in enumerate(zip(self.files, shards)):
            header, offset = {}, 0
            for key in keys:
                shape, dtype = spec[key]
                header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes[key]]}
                offset += nbytes[key]
            header["__metadata__"] = dict(metadata or {"format": "mlx"})
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            with open(out / fname, "wb") as fh:
                fh.write(struct.pack("<Q", len(raw)) + raw)
                fh.truncate(start + offset)
            for key in keys:
                b, e = header[key]["data_offsets"]
                self.location[key] = (shard_index, start + b, start + e)
            self.total += offset
        self._cursor = {key: loc[1] for key, loc in self.location.items()}
        self._handles: dict[int, object] = {}

    def write(self, key: str, data: bytes | memoryview) -> None:
        shard, _, end = self.location[key]
        pos = self._cursor[key]
        if pos + len(data) > end:
            raise ValueError(f"{key}: writing past the tensor's end")
        fh = self._handles.get(shard)
        if fh is None:
            for other in list(self._handles):  # tensors are written in order: at most one shard stays open
                self._handles.pop(other).close()
            fh = self._handles[shard] = open(self.out / self.files[shard], "r+b")
        fh.seek(pos)
        fh.write(data)
        self._cursor[key] = pos + len(data)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        short = [k for k, (_, _, end) in self.location.items() if self._cursor[k] != end]
        if short:
            raise RuntimeError(f"tensors left incomplete: {short[:5]}")
        write_index(self.out, {key: self.files[loc[0]] for key, loc in self.location.items()}, self.total)
