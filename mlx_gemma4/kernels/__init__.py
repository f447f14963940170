"""Custom kernels for Gemma 4's hot spots, with one dispatch point. A leaf package: it imports nothing from
mlx_gemma4 but its own files.

    expert_glu(x, indices, weights, gate_up, down)        top-k expert GeGLU (26B A4B MoE)
    windowed_attention(q, k, v, scale=, q_start=, k_start=, window=, block_ids=)
    products.quantized_matmul / compact_matmul / dequantize   products with compact (quantized, bf16) weights

Each call runs the Metal kernel when MLX has a Metal device and computes on the GPU, and the pure-MLX path
otherwise: backend "auto". A loaded model's runtime policy (mlx_gemma4.runtime; MLX_GEMMA4_KERNELS is its default)
may name another around its forward pass (`use_runtime_defaults`):
    auto (default) | metal (error without Metal) | mlx
`use_backend(name)` overrides both for a `with` block. How Metal source is run is one kernel factory,
`mx.fast.metal_kernel` unless `use_kernel_factory(factory)` installs another for a `with` block (the tests install
the msim emulator, which runs the same kernel bodies on a Linux CPU).
"""

from __future__ import annotations

import contextlib
import contextvars

import mlx.core as mx

from ._metal import KernelFactory, KernelRunner, KernelSpec
from .gather_experts import ExpertBank, expert_glu_metal, expert_glu_mlx
from .gather_experts import validate_inputs as _validate_experts
from .products import _unpack_policy, default_unpack_min_rows, use_unpack_rows
from .sliding_attention import attention_plan, windowed_attention_metal, windowed_attention_mlx
from .sliding_attention import validate_inputs as _validate_attention

__all__ = ["ExpertBank", "KernelFactory", "KernelRunner", "KernelSpec", "expert_glu", "windowed_attention",
           "backend", "use_backend", "use_kernel_factory", "use_runtime_defaults", "use_unpack_rows",
           "default_unpack_min_rows", "attention_plan"]

BACKENDS = ("auto", "metal", "mlx")

# an explicit use_backend() block wins over the running model's policy, which wins over "auto"
_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_backend", default=None)
_backend_policy: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_backend_policy", default=None)
_installed_runner: contextvars.ContextVar[KernelRunner | None] = contextvars.ContextVar("kernel_runner",
                                                                                        default=None)
_metal_runner: KernelRunner | None = None  # mx.fast.metal_kernel's, built on first use


def _metal_available() -> bool:
    return bool(mx.metal.is_available())


def _requested() -> str:
    return _backend_override.get() or _backend_policy.get() or "auto"


def _resolve() -> tuple[str, KernelRunner | None]:
    """-> ('metal', the runner of the installed kernel factory) or ('mlx', None)."""
    global _metal_runner
    name = _requested()
    if name == "auto":
        name = "metal" if _metal_available() and mx.default_device() == mx.gpu else "mlx"
    if name == "mlx":
        return name, None
    runner = _installed_runner.get()
    if runner is None:
        if not _metal_available():
            raise RuntimeError("Metal kernels requested (kernel backend 'metal') but MLX has no Metal device here; "
                               "use 'auto' or 'mlx'")
        _metal_runner = _metal_runner or KernelRunner()
        runner = _metal_runner
    return name, runner


def backend() -> str:
    """The backend the next kernel call will use: 'metal' or 'mlx'."""
    return _resolve()[0]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend ('auto', 'metal', 'mlx') inside a `with` block."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


@contextlib.contextmanager
def use_runtime_defaults(*, backend: str = "auto", unpack_min_rows: int | None = None):
    """A model's runtime policy for the kernel calls inside a `with` block (mlx_gemma4.runtime.RuntimePolicy.applied
    wraps the model's forward pass in it): the backend, and the rows from which CPU products unpack compact weights
    (None: never). `use_backend` / `use_unpack_rows` blocks around it still win."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    tokens = _backend_policy.set(backend), _unpack_policy.set(unpack_min_rows)
    try:
        yield
    finally:
        _backend_policy.reset(tokens[0])
        _unpack_policy.reset(tokens[1])


@contextlib.contextmanager
def use_kernel_factory(factory: KernelFactory):
    """Run Metal kernel source through `factory` (called like `mx.fast.metal_kernel`) inside a `with` block;
    yields the `KernelRunner` that builds the kernels with it."""
    runner = KernelRunner(factory)
    token = _installed_runner.set(runner)
    try:
        yield runner
    finally:
        _installed_runner.reset(token)


def expert_glu(x: mx.array, indices: mx.array, weights: mx.array, gate_up: ExpertBank,
               down: ExpertBank) -> mx.array:
    """out[t] = sum_k weights[t,k] * down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t])), e = indices[t,k].

    x (T, H); indices (T, K) int32 expert ids; weights (T, K) routing weights. gate_up is (E, 2I, H) with gate
    rows [:I] and up rows [I:], down is (E, H, I), both plain float or MLX affine-quantized, read in place.
    Returns (T, H) in x's dtype."""
    _validate_experts(x, indices, weights, gate_up, down)
    name, runner = _resolve()
    if x.shape[0] == 0:
        return mx.zeros(x.shape, x.dtype)
    if name == "mlx":
        return expert_glu_mlx(x, indices, weights, gate_up, down)
    return expert_glu_metal(runner, x, indices, weights, gate_up, down)


def windowed_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, q_start: int, k_start: int,
                       window: int | None, block_ids: mx.array | None = None) -> mx.array:
    """Attention of q (B, Hq, L, D) over k, v (B, Hkv, S, D) with causal + sliding-window + image-block mask.

    Query i has position q_start + i, key j has position k_start + j. Key j is visible to query i iff
    (kpos <= qpos or both are in the same image block) and (window is None or qpos - kpos < window).
    block_ids: optional int32 (S,) image-block id per key position (-1 = text). Returns (B, Hq, L, D) in q's
    dtype; softmax in float32."""
    _validate_attention(q, k, v, scale, q_start, k_start, window, block_ids)
    name, runner = _resolve()
    if q.size == 0:
        return mx.zeros(q.shape, q.dtype)
    kw = dict(scale=scale, q_start=q_start, k_start=k_start, window=window, block_ids=block_ids)
    if name == "mlx":
        return windowed_attention_mlx(q, k, v, **kw)
    return windowed_attention_metal(runner, q, k, v, **kw)
