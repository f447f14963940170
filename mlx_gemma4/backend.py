"""Compute-backend policy: which BLAS the CPU backend uses, and which dtype computes fastest.

MLX's Linux CPU wheel (`mlx[cpu]`) links the unoptimized reference BLAS. An optimized BLAS with
unprefixed cblas symbols, loaded globally *before* `mlx.core` is first imported, takes over its
`cblas_sgemm` calls (a float32 matmul measured 2.5 -> 100 GFLOP/s on 2 cores). This module must
therefore be imported before anything imports `mlx.core`; `mlx_gemma4/__init__.py` does that.

Environment:
  MLX_GEMMA4_BLAS = auto (default) | off | /path/to/libblas.so
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

# Candidates in order of preference. Debian/Ubuntu's libopenblas0-pthread installs the first.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

blas_in_use: str = "platform default"


def _pip_mkl() -> list[str]:
    """libmkl_rt from the PyPI `mkl` wheel, if installed (it exports unprefixed cblas_*)."""
    return sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))


def preload_blas() -> str:
    """Load an optimized BLAS globally if we are on Linux and mlx.core is not yet imported.

    Returns a short description of the BLAS in use (also kept in `blas_in_use`)."""
    global blas_in_use
    if sys.platform == "darwin":
        blas_in_use = "Accelerate (macOS)"
        return blas_in_use
    choice = os.environ.get("MLX_GEMMA4_BLAS", "auto")
    if choice == "off":
        blas_in_use = "reference BLAS (MLX_GEMMA4_BLAS=off)"
        return blas_in_use
    if "mlx.core" in sys.modules:
        blas_in_use = "unknown (mlx.core was imported before mlx_gemma4)"
        return blas_in_use
    paths = [choice] if choice != "auto" else [*_CANDIDATES, *_pip_mkl()]
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        blas_in_use = os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path)
        return blas_in_use
    if choice != "auto":
        raise RuntimeError(f"MLX_GEMMA4_BLAS={choice!r}: no loadable BLAS library at that path")
    blas_in_use = "reference BLAS (no optimized BLAS found; on Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    return blas_in_use


# ---- compute dtype ------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def default_dtype(quantized: bool = False):
    """The compute dtype for float weights on this backend.

    CPU: float32 (bf16 matmuls measured ~40x slower than float32 with OpenBLAS here, since MLX's CPU bf16
    GEMM does not use BLAS). Metal/CUDA: bfloat16 (the checkpoints' own dtype, half the memory)."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        return mx.bfloat16
    return mx.float32


def resolve_dtype(dtype=None, quantized: bool = False):
    """An explicit dtype (mx.Dtype or name), else MLX_GEMMA4_DTYPE, else the backend default."""
    import mlx.core as mx

    choice = dtype if dtype is not None else os.environ.get("MLX_GEMMA4_DTYPE")
    if choice is None:
        return default_dtype(quantized)
    if isinstance(choice, mx.Dtype):
        return choice
    name = _DTYPES.get(str(choice).lower())
    if name is None:
        raise ValueError(f"unsupported dtype {choice!r} (use float32, bfloat16 or float16)")
    return getattr(mx, name)


def resolve_weights_dtype(weights_dtype=None, compute_dtype=None):
    """The dtype float weight matrices are stored in: an explicit one, else MLX_GEMMA4_WEIGHTS_DTYPE, else the
    compute dtype. A narrower one (bfloat16 under float32 compute) halves the weights' memory; products then
    upcast per call (mlx_gemma4.compact)."""
    import mlx.core as mx

    compute = resolve_dtype(compute_dtype)
    choice = weights_dtype if weights_dtype is not None else os.environ.get("MLX_GEMMA4_WEIGHTS_DTYPE")
    if choice is None:
        return compute
    stored = choice if isinstance(choice, mx.Dtype) else getattr(mx, _DTYPES.get(str(choice).lower(), ""), None)
    if stored is None:
        raise ValueError(f"unsupported weights dtype {choice!r} (use float32, bfloat16 or float16)")
    if stored.size > compute.size:
        raise ValueError(f"weights dtype {stored} is wider than the compute dtype {compute}")
    return stored


# ---- compute path policy ----------------------------------------------------------------------
#
# Measured with benchmarks/backend.py on MLX's CPU backend, OpenBLAS preloaded, 2 cores (tables and dates in
# benchmarks/RESULTS.md section 1):
#   prefill-shaped products: float32 matmul (BLAS sgemm) is 10x+ faster than bf16/fp16 (MLX's own loops) and
#     ~50x faster than quantized_matmul, which runs at ~1.5-2 GFLOP/s whatever the row count
#   decode-shaped (one row): memory-bound; quantized_matmul with float32 scales is in the same range as a float32
#     gemv on 1/8 of the bytes, bf16 quantized_matmul ~9x slower
# Hence on CPU: compute in float32 (resolve_dtype); quantized weights stay packed, with float32 scales/biases (the
# loader casts every float tensor to the compute dtype); products with 8+ rows unpack the weight and use sgemm,
# one-row products stay quantized (mlx_gemma4.kernels.products, MLX_GEMMA4_UNPACK_ROWS overrides). On Metal bf16 and
# the quantized kernels.


def describe_policy(dtype=None) -> str:
    """One line for stats and benchmark headers: device, BLAS and compute dtype (and where it came from)."""
    import mlx.core as mx

    source = "argument" if dtype is not None else ("MLX_GEMMA4_DTYPE" if os.environ.get("MLX_GEMMA4_DTYPE")
                                                   else "backend default")
    resolved = str(resolve_dtype(dtype)).replace("mlx.core.", "")
    return f"device {mx.default_device()}, BLAS {blas_in_use}, compute dtype {resolved} ({source})"
