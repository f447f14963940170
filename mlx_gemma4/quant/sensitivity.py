"""How much each decoder matrix's quantization moves its layer's output (the `dynamic` recipe's sensitivity).

For every matrix the plan quantizes at the base bit width, the layer is run again on the calibration batch with only
that matrix replaced by its quantized values (fitted, activation-weighted): the squared distance between that output
and the float output, summed over the batch, is the matrix's error. The layer output is the residual stream, so
errors of matrices in different layers are in the same units; a larger error means more to gain from more bits.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import affine
from .apply import importance_of, quantized_tensors
from .calibrate import InputStats


def planned_bits(plan: dict[str, Any], path: str) -> tuple[int, int] | None:
    """(bits, group_size) the plan gives a module, None when it stays in float."""
    rule = plan.get(path, True)
    if rule is False:
        return None
    if isinstance(rule, dict):
        return rule.get("bits", plan["bits"]), rule.get("group_size", plan["group_size"])
    return plan["bits"], plan["group_size"]


def layer_errors(layer: nn.Module, prefix: str, args: tuple, out, plan: dict[str, Any],
                 stats: dict[str, InputStats]) -> dict[str, float]:
    """{full path: output error} for the layer's matrices quantized at the plan's base bits (see the module
    docstring). `args`/`out`: the layer's call arguments and float output."""
    reference = out[0] if isinstance(out, tuple) else out
    base = (plan["bits"], plan["group_size"])
    errors = {}
    for path, module in layer.named_modules():
        full = f"{prefix}.{path}"
        if not hasattr(module, "to_quantized") or planned_bits(plan, full) != base:
            continue
        originals = {}
        for name, *_ in quantized_tensors(module):
            if name not in module:
                continue
            originals[name] = module[name]
            fake = affine.fake_quantize(module[name], base[1], base[0], importance_of(full, name, stats, False))
            module[name] = fake.astype(originals[name].dtype)
        y = layer(*args)
        y = y[0] if isinstance(y, tuple) else y
        err = ((y.astype(mx.float32) - reference.astype(mx.float32)) ** 2).sum()
        errors[full] = float(err)
        for name, w in originals.items():
            module[name] = w
    return errors
