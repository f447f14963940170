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


# ----------------------------------------------------------------------------------------------------------------
# Compute dtype policy
#
# Measured on MLX's CPU backend with OpenBLAS preloaded (benchmarks/backend.py, table in benchmarks/RESULTS.md):
# float32 matmuls go through cblas_sgemm and are an order of magnitude faster than bfloat16/float16 matmuls and
# than quantized_matmul, which MLX's CPU backend computes with its own unvectorized loops. So on CPU we compute in
# float32 and, when the memory allows, expand quantized weights to float32 at load. On Metal, bf16 and the
# quantized kernels are the fast path and quantized weights stay quantized.

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def _env_dtype() -> str | None:
    value = os.environ.get("MLX_GEMMA4_DTYPE", "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"MLX_GEMMA4_DTYPE={value!r}: expected auto or one of {', '.join(COMPUTE_DTYPES)}")
    return value


def default_compute_dtype() -> str:
    """The dtype activations, the KV cache and unquantized weights use: MLX_GEMMA4_DTYPE if set, else
    float32 on the CPU backend and bfloat16 on Metal."""
    return _env_dtype() or ("bfloat16" if _on_gpu() else "float32")


def choose_compute_dtype(requested: str | None = None) -> str:
    """`load(dtype=...)` wins over MLX_GEMMA4_DTYPE, which wins over the backend default."""
    if requested is None or requested == "auto":
        return default_compute_dtype()
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={requested!r}: expected auto or one of {', '.join(COMPUTE_DTYPES)}")
    return requested


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (MemAvailable on Linux, physical memory on macOS)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def should_dequantize(dense_bytes: int, dtype: str | None = None, *, available: int | None = None,
                      headroom: float = 0.8) -> bool:
    """Expand quantized weights to `dtype` at load? Only on the CPU backend with a float32 compute dtype (where a
    dense float32 matmul beats quantized_matmul), and only when the expanded weights (`dense_bytes`) fit in
    `headroom` of the available memory. MLX_GEMMA4_DEQUANTIZE=0/1 forces the answer."""
    forced = os.environ.get("MLX_GEMMA4_DEQUANTIZE")
    if forced in ("0", "1"):
        return forced == "1"
    if _on_gpu() or (dtype or default_compute_dtype()) != "float32":
        return False
    available = available_memory_bytes() if available is None else available
    return available is not None and dense_bytes <= headroom * available


def describe_policy() -> str:
    """One line for stats and benchmark headers: device, BLAS and compute dtype."""
    import mlx.core as mx

    dtype = default_compute_dtype()
    source = "MLX_GEMMA4_DTYPE" if _env_dtype() else "backend default"
    return f"device {mx.default_device()}, BLAS {blas_in_use}, compute dtype {dtype} ({source})"
