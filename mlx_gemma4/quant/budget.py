"""Bits per weight, and spending a bits-per-weight budget where the quantization error is largest.

Bits per weight count every weight matrix of the model (embeddings and any float matrices included; norms and
scalars, a few thousand values, are left out): a quantized matrix costs its bits plus 32 / group_size for its
scale and bias (stored as 16-bit floats), a float matrix 16 bits.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

SCALE_BITS = 16  # each group's scale and bias, as checkpoints store them (bfloat16)
FLOAT_BITS = 16


def cost(bits: int | None, group_size: int | None) -> float:
    """Bits one weight costs: float (bits None) or quantized with a 16-bit scale and bias per group."""
    return FLOAT_BITS if bits is None else bits + 2 * SCALE_BITS / group_size


def _is_quantized(module: nn.Module) -> bool:
    return any(key == "scales" or key.endswith("_scales") for key in module)  # an expert bank may be float


def matrices(model: nn.Module) -> dict[str, tuple[int | None, int | None, int]]:
    """{module path: (bits, group_size, weights)} for every module holding weight matrices (bits None: float)."""
    from .apply import bank_spec, quantized_tensors

    out = {}
    for path, module in model.named_modules():
        if _is_quantized(module):
            for name, packed, *_ in quantized_tensors(module):
                spec = bank_spec(module, name)
                if spec is None:  # a bank left in float
                    out[f"{path}.{name}"] = (None, None, module[name].size)
                else:
                    out[f"{path}.{name}"] = (spec[0], spec[1], module[packed].size * 32 // spec[0])
            continue
        for name, w in module.items():
            if isinstance(w, mx.array) and w.ndim >= 2:
                out[f"{path}.{name}"] = (None, None, w.size)
    return out


def bits_per_weight(model: nn.Module) -> float:
    """Bits per weight of a loaded (quantized or float) model."""
    specs = matrices(model).values()
    return sum(n * cost(b, g) for b, g, n in specs) / sum(n for *_, n in specs)


def plan_bits_per_weight(model: nn.Module, plan: dict[str, Any]) -> float:
    """Bits per weight the float `model` will have once quantized as `plan` says."""
    from ..model import is_tower_param
    from .sensitivity import planned_bits

    bits = count = 0
    modules = dict(model.named_modules())
    for name, (_, _, n) in matrices(model).items():
        path = name.rsplit(".", 1)[0]
        module = modules[path]
        spec = None
        if hasattr(module, "to_quantized") and not is_tower_param(path):
            spec = planned_bits(plan, path)
        bits += n * cost(*(spec or (None, None)))
        count += n
    return bits / count


def allocate(model: nn.Module, plan: dict[str, Any], errors: dict[str, float], target_bpw: float,
             high_bits: tuple[int, ...] = (6, 8)) -> dict[str, dict]:
    """Overrides raising matrices to `high_bits` within `target_bpw`: greedily the step (to the next bit width of
    one matrix) with the largest error reduction per bit spent. A matrix's error at b bits is taken as its measured
    error at the base width times 4^-(b - base) (each bit halves the step)."""
    base_bits, group_size = plan["bits"], plan["group_size"]
    specs = matrices(model)
    sizes = {p: sum(n for name, (_, _, n) in specs.items() if name.rsplit(".", 1)[0] == p) for p in errors}
    total = sum(n for *_, n in specs.values())
    spare = (target_bpw - plan_bits_per_weight(model, plan)) * total
    current = {p: base_bits for p in errors}
    ladder = [b for b in high_bits if b > base_bits]
    overrides = {}
    while True:
        best = None
        for path, err in errors.items():
            nxt = next((b for b in ladder if b > current[path]), None)
            if nxt is None:
                continue
            gain = err * (4.0 ** -(current[path] - base_bits) - 4.0 ** -(nxt - base_bits))
            spent = sizes[path] * (nxt - current[path])
            if spent <= spare and (best is None or gain / spent > best[0]):
                best = (gain / spent, path, nxt, spent)
        if best is None:
            break
        _, path, nxt, spent = best
        current[path] = nxt
        spare -= spent
        overrides[path] = {"group_size": group_size, "bits": nxt}
    return overrides


LAYER_COLUMNS = [f"{part}.weight" for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj", "router.proj", "per_layer_input_gate", "per_layer_projection")] + [
    "experts.gate_up_proj", "experts.down_proj"]


def _bits_label(bits: int | None) -> str:
    return "-" if bits is None else str(bits)


def describe(model: nn.Module) -> str:
    """Bits per weight, the matrices at each bit width outside the decoder layers, and a per-layer table."""
    specs = matrices(model)
    layer_prefix = "language_model.layers."
    lines = [f"{bits_per_weight(model):.3f} bits per weight (every weight matrix, embeddings included; scales, "
             f"biases and float matrices counted at 16 bits)"]
    outside = {}
    for name, (bits, group_size, _) in specs.items():
        if not name.startswith(layer_prefix):
            key = "float" if bits is None else f"{bits}-bit g{group_size}"
            outside.setdefault(key, []).append(name)
    for key, names in sorted(outside.items()):
        lines.append(f"  {key}: {', '.join(names)}")
    rows: dict[int, dict[str, int | None]] = {}
    for name, (bits, _, _) in specs.items():
        if name.startswith(layer_prefix):
            index, rest = name[len(layer_prefix):].split(".", 1)
            rows.setdefault(int(index), {})[rest] = bits
    if rows:
        present = {c for row in rows.values() for c in row}
        columns = [c for c in LAYER_COLUMNS if c in present] + sorted(present - set(LAYER_COLUMNS))
        short = [c.replace("self_attn.", "").replace("mlp.", "").replace(".weight", "") for c in columns]
        lines.append("  bits per layer: " + " ".join(short))
        for index in sorted(rows):
            cells = [_bits_label(rows[index].get(c)) if c in rows[index] else "." for c in columns]
            lines.append(f"    layer {index:>3}: " + " ".join(f"{v:>{len(s)}}" for v, s in zip(cells, short)))
    return "\n".join(lines)
