"""The runtime policy: which BLAS MLX's CPU backend uses, the compute dtype, the dtype float weights are stored in,
the kernel backend, and from how many rows a product with a compact weight unpacks it.

`RuntimePolicy.from_arguments(...)` builds it once, in `load()` (the model keeps it as `model.policy` and applies
it around its forward pass). Arguments win; these environment variables are only their defaults (read there and
by the command lines, nowhere else):

  MLX_GEMMA4_DTYPE           float32 | bfloat16 | float16      compute dtype (default: the backend's best)
  MLX_GEMMA4_WEIGHTS_DTYPE   bfloat16 | float16 | float32      storage of float weight matrices (default: compute)
  MLX_GEMMA4_KERNELS         auto | metal | mlx                kernel backend (mlx_gemma4.kernels)
  MLX_GEMMA4_UNPACK_ROWS     N (0 = never)                     CPU products with N+ rows unpack compact weights
  MLX_GEMMA4_BLAS            auto | off | /path/to/libblas.so  read once, when mlx_gemma4 is imported

BLAS: MLX's Linux CPU wheel (`mlx[cpu]`) links the unoptimized reference BLAS. An optimized BLAS with unprefixed
cblas symbols, loaded globally *before* `mlx.core` is first imported, takes over its `cblas_sgemm` calls (a
float32 matmul measured 2.5 -> 100 GFLOP/s on 2 cores). So `preload_blas` runs when `mlx_gemma4` is imported,
before anything imports `mlx.core`; it is the one process-wide part of the policy.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass
from typing import Any

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


# ---- the policy ------------------------------------------------------------------------------------------
#
# Measured with benchmarks/backend.py on MLX's CPU backend, OpenBLAS preloaded, 2 cores (tables and dates in
# benchmarks/RESULTS.md section 1):
#   prefill-shaped products: float32 matmul (BLAS sgemm) is 10x+ faster than bf16/fp16 (MLX's own loops) and
#     ~50x faster than quantized_matmul, which runs at ~1.5-2 GFLOP/s whatever the row count
#   decode-shaped (one row): memory-bound; quantized_matmul with float32 scales is in the same range as a float32
#     gemv on 1/8 of the bytes, bf16 quantized_matmul ~9x slower
# Hence on CPU: compute in float32; quantized weights stay packed, with float32 scales/biases (the loader casts
# every float tensor to the compute dtype); products with 8+ rows unpack the weight and use sgemm, one-row products
# stay quantized (mlx_gemma4.kernels.products). On Metal bf16 and the quantized kernels.

ENV_DTYPE = "MLX_GEMMA4_DTYPE"
ENV_WEIGHTS_DTYPE = "MLX_GEMMA4_WEIGHTS_DTYPE"
ENV_KERNELS = "MLX_GEMMA4_KERNELS"
ENV_UNPACK_ROWS = "MLX_GEMMA4_UNPACK_ROWS"

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def default_dtype():
    """The compute dtype for float weights on this backend.

    CPU: float32 (bf16 matmuls measured ~40x slower than float32 with OpenBLAS here, since MLX's CPU bf16
    GEMM does not use BLAS). Metal/CUDA: bfloat16 (the checkpoints' own dtype, half the memory)."""
    import mlx.core as mx

    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def parse_dtype(choice, what: str = "dtype"):
    """An mx.Dtype, or one of its names (float32, bfloat16, float16 and their short forms)."""
    import mlx.core as mx

    if isinstance(choice, mx.Dtype):
        return choice
    name = _DTYPES.get(str(choice).lower())
    if name is None:
        raise ValueError(f"unsupported {what} {choice!r} (use float32, bfloat16 or float16)")
    return getattr(mx, name)


@dataclass(frozen=True)
class RuntimePolicy:
    """How a loaded model computes. Built once by `from_arguments` (in `load()`); the model applies the kernel
    choices around its forward pass (`applied()`), and its products were chosen for `dtype`/`weights_dtype` when
    it was loaded (mlx_gemma4.compact.use_products)."""

    dtype: Any  # mx.Dtype: activations, KV cache, norms, scales
    weights_dtype: Any  # mx.Dtype: the text decoder's float weight matrices (narrower than dtype: compact products)
    kernel_backend: str = "auto"  # mlx_gemma4.kernels: auto | metal | mlx
    unpack_min_rows: int | None = None  # CPU: products with this many rows unpack compact weights; None: never
    dtype_source: str = "backend default"  # where dtype came from (for describe())

    @classmethod
    def from_arguments(cls, dtype=None, weights_dtype=None, kernels: str | None = None,
                       unpack_rows: int | None = None, environ=None) -> "RuntimePolicy":
        """Arguments first, then the MLX_GEMMA4_* environment variables (see the module docstring), then the
        backend's defaults."""
        from .kernels import BACKENDS, default_unpack_min_rows

        env = os.environ if environ is None else environ
        if dtype is not None:
            compute, source = parse_dtype(dtype), "argument"
        elif env.get(ENV_DTYPE):
            compute, source = parse_dtype(env[ENV_DTYPE], f"{ENV_DTYPE} dtype"), ENV_DTYPE
        else:
            compute, source = default_dtype(), "backend default"
        stored = weights_dtype if weights_dtype is not None else env.get(ENV_WEIGHTS_DTYPE) or compute
        stored = parse_dtype(stored, "weights dtype")
        if stored.size > compute.size:
            raise ValueError(f"weights dtype {stored} is wider than the compute dtype {compute}")
        backend = (kernels if kernels is not None else env.get(ENV_KERNELS, "auto")).strip().lower() or "auto"
        if backend not in BACKENDS:
            where = "kernels" if kernels is not None else ENV_KERNELS
            raise ValueError(f"{where}={backend!r}: expected one of {', '.join(BACKENDS)}")
        rows = default_unpack_min_rows()
        if rows is not None:  # only the CPU unpacks
            given = unpack_rows if unpack_rows is not None else env.get(ENV_UNPACK_ROWS)
            if given is not None:
                try:
                    rows = int(given)
                except ValueError:
                    raise ValueError(f"{ENV_UNPACK_ROWS}={given!r} is not a number of rows") from None
                rows = rows if rows > 0 else None
        return cls(compute, stored, backend, rows, source)

    def applied(self):
        """A context manager: the kernel backend and unpack threshold for the calls inside it (a `use_backend` /
        `use_unpack_rows` block around them still wins)."""
        from .kernels import use_runtime_defaults

        return use_runtime_defaults(backend=self.kernel_backend, unpack_min_rows=self.unpack_min_rows)

    def describe(self) -> str:
        """One line for stats and benchmark headers: device, BLAS and compute dtype (and where it came from)."""
        import mlx.core as mx

        name = str(self.dtype).replace("mlx.core.", "")
        return f"device {mx.default_device()}, BLAS {blas_in_use}, compute dtype {name} ({self.dtype_source})"
