"""Self-verifying dispatch: a Metal kernel runs only where it compiles, agrees with the MLX path and is faster.

The first time a kernel class is needed (a kernel with one dtype / quantization / head dim / GQA shape, see
`KernelClass`), `verdict()` builds it, runs it on a small input against the MLX path, then times both on the
model's real shapes (a few iterations). The kernel is used only if it compiled, agreed (`TOLERANCE`) and was
faster; otherwise the MLX path runs, with one warning naming the reason. Verdicts are kept for the process and
in a JSON file under the user's cache directory, valid for one (device, OS version, MLX version, package
version); the class key also carries a hash of the kernel source, so a changed kernel is verified again.
`python -m mlx_gemma4.selfcheck` runs the same checks for every class and prints them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

# Largest |kernel - reference| / max |reference| accepted, per dtype, where the reference is the MLX path computed
# in float32 (the kernel tests use the same bounds). On the real shapes the kernel is compared with the MLX path in
# the model's dtype, which rounds on its own: there twice the bound.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 3e-2}
TIMING_ITERATIONS = 5
CACHE_FILE = "kernel-verdicts.json"


@dataclass(frozen=True)
class KernelClass:
    """A family of launches that share one verdict, e.g. decode attention on bfloat16 with head dim 512 and
    8 query heads per KV head."""

    kernel: str
    detail: tuple[tuple[str, object], ...]
    source_hash: str

    @property
    def key(self) -> str:
        fields = "/".join(f"{name}={value}" for name, value in self.detail)
        return f"{self.kernel}/{fields}/src={self.source_hash}"


def source_hash(*specs) -> str:
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.source.encode())
        h.update(spec.header.encode())
    return h.hexdigest()[:12]


@dataclass
class Verdict:
    compiled: bool
    agrees: bool | None  # None: not run (it did not compile)
    max_rel_error: float | None
    kernel_ms: float | None  # None: not timed
    mlx_ms: float | None
    chosen: str  # "metal" or "mlx"
    reason: str

    @property
    def failed(self) -> bool:
        return not self.compiled or self.agrees is False


@dataclass
class Check:
    """What verifying one class needs: the kernel and the MLX path in float32 on a small input (the agreement
    check), and `real`, which builds the real-shape inputs and returns the kernel and the MLX path on them
    (timing; built only then)."""

    kernel: Callable[[], mx.array]
    reference: Callable[[], mx.array]
    real: Callable[[], tuple[Callable[[], mx.array], Callable[[], mx.array]]] | None
    dtype: mx.Dtype


def relative_error(got: mx.array, want: mx.array) -> float:
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    scale = float(mx.abs(want).max()) or 1.0
    return float(mx.abs(got - want).max()) / scale


def _time_ms(fn: Callable[[], mx.array], iterations: int) -> tuple[float, mx.array]:
    out = fn()
    mx.eval(out)  # warm-up: compiles, allocates
    best = float("inf")
    for _ in range(iterations):
        t0 = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, out


def _failure(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"did not compile or run: {first[:300]}"


def measure(check: Check, *, timing: bool, iterations: int = TIMING_ITERATIONS) -> Verdict:
    """Compile and run the kernel on the small input, compare with the float32 MLX path, then (with `timing`)
    time the kernel and the MLX path on the real shapes."""
    tol = TOLERANCE[check.dtype]
    try:
        got = check.kernel()
        mx.eval(got)
    except Exception as e:  # the Metal compiler (or the kernel's launch) rejected it
        return Verdict(False, None, None, None, None, "mlx", _failure(e))
    err = relative_error(got, check.reference())
    if not err <= tol:
        return Verdict(True, False, err, None, None, "mlx", f"disagrees with the MLX path (max rel error "
                       f"{err:.2e} > {tol:.0e})")
    if not timing or check.real is None:
        return Verdict(True, True, err, None, None, "mlx", "correctness only (not timed here)")
    real_kernel, real_mlx = check.real()
    try:
        kernel_ms, got = _time_ms(real_kernel, iterations)
    except Exception as e:  # another instantiation of the class (other shapes) failed
        return Verdict(False, None, None, None, None, "mlx", _failure(e))
    mlx_ms, want = _time_ms(real_mlx, iterations)
    real_err = relative_error(got, want)
    if not real_err <= 2 * tol:
        return Verdict(True, False, real_err, kernel_ms, mlx_ms, "mlx", f"disagrees with the MLX path on the "
                       f"real shapes (max rel error {real_err:.2e} > {2 * tol:.0e})")
    if kernel_ms < mlx_ms:
        return Verdict(True, True, err, kernel_ms, mlx_ms, "metal", f"faster ({kernel_ms:.3f} ms vs MLX "
                       f"{mlx_ms:.3f} ms)")
    return Verdict(True, True, err, kernel_ms, mlx_ms, "mlx", f"slower than the MLX path ({kernel_ms:.3f} ms "
                   f"vs {mlx_ms:.3f} ms)")


# ------------------------------------------------------------------------------------------ the cache


def default_cache_dir() -> Path:
    """The user's cache directory for mlx-gemma4 (~/Library/Caches on macOS, $XDG_CACHE_HOME or ~/.cache)."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mlx-gemma4"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-gemma4")
    except PackageNotFoundError:
        return "unknown"


def environment(device: str) -> dict[str, str]:
    """What a verdict is valid for: device, OS version, MLX version, package version."""
    os_version = platform.mac_ver()[0] or platform.platform()
    return {"device": device, "os": os_version, "mlx": mx.__version__, "package": package_version()}


class VerdictStore:
    """Verdicts of one device: in memory for the process, and in `cache_dir / CACHE_FILE` across processes.
    A file written for another environment is ignored and replaced (that invalidates every verdict in it)."""

    def __init__(self, device: str, cache_dir: Path | None = None):
        self.environment = environment(device)
        self.path = (cache_dir or default_cache_dir()) / CACHE_FILE
        self._verdicts: dict[str, Verdict] | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Verdict]:
        if self._verdicts is None:
            self._verdicts = {}
            try:
                data = json.loads(self.path.read_text())
                if data.get("environment") == self.environment:
                    self._verdicts = {k: Verdict(**v) for k, v in data.get("verdicts", {}).items()}
            except (OSError, ValueError, TypeError):
                pass  # no file, or an unreadable one: verify again
        return self._verdicts

    def _save(self) -> None:
        data = {"environment": self.environment, "verdicts": {k: asdict(v) for k, v in self._verdicts.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs a verification per process

    def cached(self, klass: KernelClass) -> Verdict | None:
        with self._lock:
            return self._load().get(klass.key)

    def record(self, klass: KernelClass, verdict: Verdict) -> None:
        with self._lock:
            self._load()[klass.key] = verdict
            self._save()

    def verdict(self, klass: KernelClass, check: Callable[[], Check], *, timing: bool = True) -> Verdict:
        """The class's verdict: cached, or measured now (and cached). Warns once per process when the
        kernel is not used because it failed, or when a fresh measurement found it slower."""
        verdict = self.cached(klass)
        fresh = verdict is None
        if fresh:
            verdict = measure(check(), timing=timing)
            self.record(klass, verdict)
        if verdict.chosen != "metal" and (verdict.failed or (fresh and verdict.kernel_ms is not None)):
            with self._lock:
                if klass.key not in self._warned:
                    self._warned.add(klass.key)
                    warnings.warn(f"mlx-gemma4: the Metal kernel for {klass.key} is not used: {verdict.reason}; "
                                  "the MLX path runs instead", RuntimeWarning, stacklevel=4)
        return verdict
