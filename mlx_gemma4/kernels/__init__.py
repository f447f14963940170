"""Custom kernels for Gemma 4's hot spots, with one dispatch point. A leaf package: it imports nothing from
mlx_gemma4 but its own files.

    expert_glu(x, indices, weights, gate_up, down)        top-k expert GeGLU (26B A4B MoE)
    windowed_attention(q, k, v, scale=, q_start=, k_start=, window=, block_ids=)
    products.quantized_matmul / compact_matmul / dequantize   products with compact (quantized, bf16) weights

Decode-sized calls (at most 8 queries / tokens) can run Metal kernels (`decode_attention.py`,
`expert_decode.py`); everything else runs MLX ops. The kernel backend chooses:
    auto (default): a Metal kernel runs only where MLX computes on a Metal GPU (`mx.default_device()`) and the
        kernel's class has passed its self-check on this machine: it compiled, agreed with the MLX path and was
        faster (`verdicts.py`; `python -m mlx_gemma4.selfcheck` shows the verdicts)
    metal: the Metal kernels, unchecked (error without Metal)
    mlx: MLX ops only
A loaded model's runtime policy (mlx_gemma4.runtime; MLX_GEMMA4_KERNELS is its default) names one around its
forward pass (`use_runtime_defaults`); `use_backend(name)` overrides both for a `with` block. How Metal source is
run is one kernel factory,
`mx.fast.metal_kernel` unless `use_kernel_factory(factory)` installs another for a `with` block (the tests
install the msim emulator, which runs the same kernel bodies on a Linux CPU; with a factory installed, `auto`
verifies the kernels as on a Mac).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import mlx.core as mx

from . import decode_attention, expert_decode
from ._metal import KernelFactory, KernelRunner, KernelSpec
from .gather_experts import ExpertBank, expert_glu_mlx
from .gather_experts import validate_inputs as _validate_experts
from .products import _unpack_policy, default_unpack_min_rows, use_unpack_rows
from .sliding_attention import attention_plan, windowed_attention_mlx
from .sliding_attention import validate_inputs as _validate_attention
from .verdicts import KernelClass, Verdict

__all__ = ["ExpertBank", "KernelFactory", "KernelRunner", "KernelSpec", "expert_glu", "windowed_attention",
           "backend", "use_backend", "use_kernel_factory", "use_runtime_defaults", "use_unpack_rows",
           "default_unpack_min_rows", "collect_checks", "attention_plan", "kernel_runner", "SPECS"]

BACKENDS = ("auto", "metal", "mlx")
SPECS = (*decode_attention.SPECS, *expert_decode.SPECS)  # every Metal kernel of the package

# an explicit use_backend() block wins over the running model's policy, which wins over "auto"
_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_backend", default=None)
_backend_policy: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernel_backend_policy", default=None)
_installed_runner: contextvars.ContextVar[KernelRunner | None] = contextvars.ContextVar("kernel_runner",
                                                                                        default=None)
_collected_checks: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kernel_checks", default=None)
_metal_runner: KernelRunner | None = None  # mx.fast.metal_kernel's, built on first use


def _metal_available() -> bool:
    return bool(mx.metal.is_available())


def _requested() -> str:
    return _backend_override.get() or _backend_policy.get() or "auto"


def kernel_runner() -> KernelRunner | None:
    """The runner Metal kernels would run on: the installed factory's, else `mx.fast.metal_kernel`'s when MLX has
    a Metal device; None without either."""
    global _metal_runner
    runner = _installed_runner.get()
    if runner is None and _metal_available():
        _metal_runner = _metal_runner or KernelRunner()
        runner = _metal_runner
    return runner


def _resolve() -> tuple[str, KernelRunner | None]:
    """-> ('metal', runner) when Metal kernels may run (forced, or auto on a Metal GPU or an installed factory),
    else ('mlx', None)."""
    name = _requested()
    if name == "mlx":
        return name, None
    runner = kernel_runner()
    if name == "metal":
        if runner is None:
            raise RuntimeError("Metal kernels requested (kernel backend 'metal') but MLX has no Metal device here; "
                               "use 'auto' or 'mlx'")
        return name, runner
    on_gpu = runner is not None and (_installed_runner.get() is not None or mx.default_device() == mx.gpu)
    return ("metal", runner) if on_gpu else ("mlx", None)


def _verified_runner(klass: Callable[[], KernelClass], check) -> KernelRunner | None:
    """The runner for one call of a kernel class, or None for the MLX path (see the module docstring)."""
    _, runner = _resolve()
    collected = _collected_checks.get()
    if collected is not None:  # collect_checks(): note the class, compute on the MLX path
        if runner is not None:
            key = klass()
            collected.setdefault(key.key, (key, lambda: check(runner)))
        return None
    if runner is None or _requested() == "metal":
        return runner
    verdict: Verdict = runner.verdicts.verdict(klass(), lambda: check(runner))
    return runner if verdict.chosen == "metal" else None


def backend() -> str:
    """'metal' where Metal kernels may run (forced, or auto on a Metal GPU / an installed factory, each class
    after its self-check), else 'mlx'."""
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
def collect_checks():
    """Inside the block every kernel call takes the MLX path and notes its kernel class instead: yields
    {class key: (KernelClass, check builder)} (what `mlx_gemma4.selfcheck --model` verifies)."""
    collected: dict = {}
    token = _collected_checks.set(collected)
    try:
        yield collected
    finally:
        _collected_checks.reset(token)


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
    rows [:I] and up rows [I:], down is (E, H, I), both plain float or MLX-quantized (any mode), read in place.
    Banks the Metal kernel does not read (`expert_decode.reads`) take the MLX path (gather_qmm).
    Returns (T, H) in x's dtype."""
    _validate_experts(x, indices, weights, gate_up, down)
    if x.shape[0] == 0:
        return mx.zeros(x.shape, x.dtype)
    if x.shape[0] <= expert_decode.MAX_TOKENS and expert_decode.reads(gate_up) and expert_decode.reads(down):
        runner = _verified_runner(lambda: expert_decode.kernel_class(x, gate_up),
                                  lambda r: expert_decode.check(r, x, indices.shape[1], gate_up, down))
        if runner is not None:
            return expert_decode.expert_decode_metal(runner, x, indices, weights, gate_up, down)
    return expert_glu_mlx(x, indices, weights, gate_up, down)


def windowed_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, q_start: int, k_start: int,
                       window: int | None, block_ids: mx.array | None = None) -> mx.array:
    """Attention of q (B, Hq, L, D) over k, v (B, Hkv, S, D) with causal + sliding-window + image-block mask.

    Query i has position q_start + i, key j has position k_start + j. Key j is visible to query i iff
    (kpos <= qpos or both are in the same image block) and (window is None or qpos - kpos < window).
    block_ids: optional int32 (S,) image-block id per key position (-1 = text). Returns (B, Hq, L, D) in q's
    dtype; softmax in float32. k and v may be strided views (a cache's slice of its buffer): the Metal kernel
    reads them in place."""
    _validate_attention(q, k, v, scale, q_start, k_start, window, block_ids)
    if q.size == 0:
        return mx.zeros(q.shape, q.dtype)
    kw = dict(scale=scale, q_start=q_start, k_start=k_start, window=window, block_ids=block_ids)
    if q.shape[2] <= decode_attention.MAX_QUERIES:
        runner = _verified_runner(lambda: decode_attention.kernel_class(q, k),
                                  lambda r: decode_attention.check(r, q, k, window=window))
        if runner is not None:
            return decode_attention.decode_attention_metal(runner, q, k, v, **kw)
    return windowed_attention_mlx(q, k, v, **kw)
