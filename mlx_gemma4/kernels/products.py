"""Products with weights stored more compactly than the compute dtype: MLX affine-quantized weights (4/8-bit, packed
uint32 with per-group scales and biases) and float weights kept in bfloat16/float16 under float32 compute.

On MLX's CPU backend `quantized_matmul` runs at ~1.5-2 GFLOP/s whatever the number of rows, and bf16/fp16 matmuls
at ~2, while BLAS sgemm runs at ~100: from a few rows on, unpacking the weight to float32 and calling sgemm is
faster, even though the unpacking is paid on every call (a 4-bit 1408x2816 expert: 0.14 s quantized at 32 rows,
0.02 s unpacked + sgemm; `benchmarks/backend.py`, RESULTS.md section 1). Products with fewer rows (decode) use the
compact weight directly: they are memory-bound, and unpacking would cost more than the product. On a GPU the
quantized kernels are always used.

The row count from which the CPU unpacks comes from the loaded model's runtime policy (mlx_gemma4.runtime, which
applies it around the model's forward pass through `use_runtime_defaults`); `use_unpack_rows(n)` overrides it for
a `with` block (0 = never).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import mlx.core as mx

UNPACK_MIN_ROWS = 8  # measured break-even on CPU is ~5 rows for a 4-bit 1408x2816 matrix

# MLX's quantization modes (mx.quantize) and the bits / group sizes each takes. Only affine stores biases; the
# floating-point modes store uint8 scales (shared exponents) and no biases.
QUANT_MODES = {
    "affine": {"bits": (2, 3, 4, 5, 6, 8), "group_sizes": (32, 64, 128)},
    "mxfp4": {"bits": (4,), "group_sizes": (32,)},
    "mxfp8": {"bits": (8,), "group_sizes": (32,)},
    "nvfp4": {"bits": (4,), "group_sizes": (16,)},
}


def quant_params_problem(group_size, bits, mode) -> str | None:
    """Why (group_size, bits, mode) is not a quantization MLX can run, or None if it is."""
    if mode not in QUANT_MODES:
        return f"unknown quantization mode {mode!r} (MLX has {', '.join(QUANT_MODES)})"
    allowed = QUANT_MODES[mode]
    if bits not in allowed["bits"]:
        return f"{mode} quantization takes bits {' or '.join(map(str, allowed['bits']))}, got {bits!r}"
    if group_size not in allowed["group_sizes"]:
        sizes = " or ".join(map(str, allowed["group_sizes"]))
        return f"{mode} quantization takes group size {sizes}, got {group_size!r}"
    if not mlx_runs_mode(mode):
        return f"{mode} quantization is not supported by the installed MLX {mx.__version__} (upgrade mlx)"
    return None


@functools.lru_cache(maxsize=None)
def mlx_runs_mode(mode: str) -> bool:
    """Whether the installed MLX quantizes in `mode` (the floating-point modes came after affine). MLX checks the
    mode when the operation is built: nothing is evaluated, so this is safe inside a compiled function."""
    settings = QUANT_MODES[mode]
    try:
        mx.quantize(mx.ones((4, 128)), group_size=settings["group_sizes"][0], bits=settings["bits"][0], mode=mode)
    except (ValueError, TypeError):
        return False
    return True

_UNSET = object()
# an explicit use_unpack_rows() block, then the running model's policy, then default_unpack_min_rows()
_unpack_override: contextvars.ContextVar = contextvars.ContextVar("unpack_rows_override", default=_UNSET)
_unpack_policy: contextvars.ContextVar = contextvars.ContextVar("unpack_rows_policy", default=_UNSET)


def default_unpack_min_rows() -> int | None:
    """UNPACK_MIN_ROWS on MLX's CPU backend; None (never unpack) on a GPU, whose quantized kernels are fast."""
    return UNPACK_MIN_ROWS if mx.default_device() == mx.cpu else None


def unpack_min_rows() -> int | None:
    """Rows from which a product with a compact weight unpacks it to the compute dtype, or None for never."""
    rows = _unpack_override.get()
    if rows is _UNSET:
        rows = _unpack_policy.get()
    return default_unpack_min_rows() if rows is _UNSET else rows


@contextlib.contextmanager
def use_unpack_rows(rows: int | None):
    """Unpack compact weights in products with at least `rows` rows inside a `with` block (0 or None: never)."""
    token = _unpack_override.set(rows if rows else None)
    try:
        yield
    finally:
        _unpack_override.reset(token)


def _unpacks(x: mx.array) -> bool:
    min_rows = unpack_min_rows()
    return min_rows is not None and x.ndim > 0 and x.size // x.shape[-1] >= min_rows


@functools.lru_cache(maxsize=None)
def _unpacker(bits: int, group_size: int):
    per_word = 32 // bits
    shifts = mx.array([bits * i for i in range(per_word)], dtype=mx.uint32)
    mask = (1 << bits) - 1

    def unpack(w, scales, biases):
        # mx.quantize packs element j of each word at bits * j (little end first); w = scale * q + bias per group.
        q = ((w[..., None] >> shifts) & mask).astype(scales.dtype)
        q = q.reshape(*w.shape[:-1], scales.shape[-1], group_size)
        return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)

    return mx.compile(unpack)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
               mode: str = "affine", dtype: mx.Dtype | None = None) -> mx.array:
    """The float matrix behind a quantized one, in `dtype` (default: the affine scales' dtype, float32 for the
    other modes). Same values as `mx.dequantize`; affine with 2/4/8 bits runs ~2.5x faster on the CPU backend."""
    if mode != "affine" or 32 % bits:
        dtype = dtype or (scales.dtype if mode == "affine" else mx.float32)
        if mode == "nvfp4" and scales.size % 2:
            # MLX 0.32's CPU nvfp4 dequantize fails to reshape an odd number of scales (e.g. a few gathered
            # embedding rows of 5 groups): dequantize with one zero row more and drop it
            rows, scale_rows = w.reshape(-1, w.shape[-1]), scales.reshape(-1, scales.shape[-1])
            rows = mx.concatenate([rows, mx.zeros_like(rows[:1])])
            scale_rows = mx.concatenate([scale_rows, mx.zeros_like(scale_rows[:1])])
            out = mx.dequantize(rows, scale_rows, None, group_size=group_size, bits=bits, mode=mode, dtype=dtype)
            return out[:-1].reshape(*w.shape[:-1], -1)
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=dtype)
    out = _unpacker(bits, group_size)(w, scales, biases)
    return out if dtype is None else out.astype(dtype)


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                     bits: int, mode: str = "affine") -> mx.array:
    """x @ W.T for a quantized W (out, in): unpacked + float matmul when x has enough rows on the CPU."""
    if _unpacks(x):
        return x @ dequantize(w, scales, biases, group_size, bits, mode, x.dtype).swapaxes(-1, -2)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


HEAD_ROWS_PER_PIECE = 32768  # rows of a quantized LM head unpacked at a time (26B: 32768 x 2816 floats = 0.37 GB)


def quantized_head_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int,
                          bits: int, mode: str = "affine") -> mx.array:
    """`quantized_matmul` for a large table (the tied LM head, 262144 rows): where the CPU unpacks, it unpacks a
    piece of rows at a time, so the float copy stays small. MLX's CPU quantized product with many rows (a prompt's
    logits for perplexity, a long verification) was 12x slower than unpack + matmul on the demo model's head."""
    if not _unpacks(x) or w.shape[0] <= HEAD_ROWS_PER_PIECE:
        return quantized_matmul(x, w, scales, biases, group_size, bits, mode)
    pieces = []
    for start in range(0, w.shape[0], HEAD_ROWS_PER_PIECE):
        rows = slice(start, start + HEAD_ROWS_PER_PIECE)
        pieces.append(quantized_matmul(x, w[rows], scales[rows], None if biases is None else biases[rows],
                                       group_size, bits, mode))
    return mx.concatenate(pieces, axis=-1)


def compact_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T for a float w stored in another dtype than x: w upcast when x has enough rows (CPU), else x cast to
    w's dtype for the product (memory-bound one-row products read half the bytes) and the result cast back."""
    w_t = w.swapaxes(-1, -2)
    if w.dtype == x.dtype or _unpacks(x):
        return x @ w_t.astype(x.dtype)
    return (x.astype(w.dtype) @ w_t).astype(x.dtype)
