"""Kernel specs and the runner that builds them through a kernel factory.

A `KernelSpec` is what `mx.fast.metal_kernel` needs (name, argument names, body, header). A `KernelRunner` turns
a spec into a callable kernel with its factory: any callable taking `mx.fast.metal_kernel`'s keyword arguments
and returning a kernel called like MLX's. The factory is `mx.fast.metal_kernel` unless one is installed with
`mlx_gemma4.kernels.use_kernel_factory` (the tests install the msim emulator's `metal_kernel`, which compiles the
same body text as C++ and runs it on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .verdicts import VerdictStore

KernelFactory = Callable[..., Callable]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""
    ensure_row_contiguous: bool = True


class KernelRunner:
    """Builds each kernel spec once with `factory` and caches it by name."""

    def __init__(self, factory: KernelFactory | None = None):
        self.factory = factory or mx.fast.metal_kernel
        self._cache: dict[str, Callable] = {}
        self._verdicts = None

    @property
    def device(self) -> str:
        """The device its kernels run on: the Metal GPU's name, or the installed factory's name."""
        if self.factory is mx.fast.metal_kernel:
            return str(mx.metal.device_info().get("device_name", "metal"))
        return f"{getattr(self.factory, '__module__', '?')}.{getattr(self.factory, '__qualname__', '?')}"

    @property
    def verdicts(self):
        """This runner's kernel verdicts (`verdicts.VerdictStore`), made on first use."""
        if self._verdicts is None:
            self._verdicts = VerdictStore(self.device)
        return self._verdicts

    @property
    def compiled(self) -> set[str]:
        """Names of the kernel specs this runner has built."""
        return set(self._cache)

    def kernel(self, spec: KernelSpec) -> Callable:
        if spec.name not in self._cache:
            self._cache[spec.name] = self.factory(
                name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
                source=spec.source, header=spec.header, ensure_row_contiguous=spec.ensure_row_contiguous)
        return self._cache[spec.name]
