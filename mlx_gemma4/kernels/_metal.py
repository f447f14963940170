"""Kernel specs and the runners that compile them.

A `KernelSpec` is what `mx.fast.metal_kernel` needs (name, argument names, body, header). A runner turns a
spec into a callable kernel: `MetalRunner` uses `mx.fast.metal_kernel` (a Mac), `EmulatorRunner` uses
msim's drop-in `metal_kernel` (tools/msim: the same body strings compiled as C++ and run on the CPU), so
tests on Linux execute exactly the text a Mac compiles.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx


@dataclass(frozen=True)
class KernelSpec:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""


class _Runner:
    """Builds each kernel spec once and caches it by name; subclasses say how to build (`_build`)."""

    name = ""

    def __init__(self):
        self._cache: dict[str, object] = {}

    @property
    def compiled(self) -> set[str]:
        """Names of the kernel specs this runner has built."""
        return set(self._cache)

    def kernel(self, spec: KernelSpec):
        if spec.name not in self._cache:
            self._cache[spec.name] = self._build(spec)
        return self._cache[spec.name]

    def _build(self, spec: KernelSpec):
        raise NotImplementedError


class MetalRunner(_Runner):
    """Compiles specs with `mx.fast.metal_kernel` (needs a Metal device)."""

    name = "metal"

    def _build(self, spec: KernelSpec):
        return mx.fast.metal_kernel(name=spec.name, input_names=list(spec.input_names),
                                    output_names=list(spec.output_names), source=spec.source, header=spec.header)


def _import_msim():
    try:
        import msim
    except ImportError:
        tools = Path(__file__).resolve().parents[2] / "tools"
        if not (tools / "msim").is_dir():
            raise ImportError("the Metal emulator `msim` is not importable and tools/msim was not found next to "
                              "the package (it ships in the source repository, not in the wheel)") from None
        sys.path.insert(0, str(tools))
        import msim
    return msim


class EmulatorRunner(_Runner):
    """Runs specs under msim. `options` are msim call options (check_order, guard, poison, ...)."""

    name = "emulate"

    def __init__(self, options: dict | None = None):
        super().__init__()
        self.options = dict(options or {})
        self._msim = _import_msim()

    def _build(self, spec: KernelSpec):
        k = self._msim.metal_kernel(name=spec.name, input_names=list(spec.input_names),
                                    output_names=list(spec.output_names), source=spec.source, header=spec.header)
        return functools.partial(k, **self.options) if self.options else k
