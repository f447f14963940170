"""GGML tensor types -> float32 numpy arrays (block layouts and formulas: ggml-quants.c, dequantize_row_*).

Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K have numpy kernels here (bit-exact with the `gguf` package's reference
dequantizers); F32, F16, BF16, F64 and the integer types are plain casts; any other type the `gguf` package can
dequantize (Q2_K, Q3_K, IQ*, TQ*, MXFP4, ...) goes through it. Anything else is a clear error.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


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
