"""The msim emulator as the kernels' factory: Metal kernel bodies run on the CPU (tests only).

`emulated_metal(**options)` installs msim's `metal_kernel` as `mlx_gemma4.kernels`' kernel factory and forces
the Metal backend for a `with` block; it yields the `KernelRunner`, whose `compiled` names the kernels that ran.
options are msim call options; the default runs every launch forward and in reverse order (race check), with
guard pages past every buffer and poisoned outputs and threadgroup memory.
"""

from __future__ import annotations

import contextlib
import functools

import msim

from mlx_gemma4 import kernels

RACE_CHECKED = dict(check_order=True, guard=True, poison=True)


def msim_factory(**options):
    """A kernel factory (called like `mx.fast.metal_kernel`) whose kernels run under msim with `options`."""

    def factory(**kernel_kw):
        kernel = msim.metal_kernel(**kernel_kw)
        return functools.partial(kernel, **options) if options else kernel

    return factory


@contextlib.contextmanager
def emulated_metal(**options):
    options = {**RACE_CHECKED, **options}
    with kernels.use_kernel_factory(msim_factory(**options)) as runner, kernels.use_backend("metal"):
        yield runner
