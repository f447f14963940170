"""Quantization plans: the `quantization` config entry (defaults plus per-module overrides) and the swap of a
model's modules for their MLX-quantized versions as a plan says. The values of a float model's quantized matrices
are then fitted by `mlx_gemma4.quant.apply`; a checkpoint's are read from its tensors (`loading`, `layouts`)."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from ..compact import use_products
from ..kernels.products import quant_params_problem
from ..model import is_tower_param

# Tensors kept at 8 bits by the `mixed` recipe: the ones users report 4 bits ruins (embedding tables, PLE,
# the router), plus the final-layer-facing PLE gates which carry small-magnitude signals.
MIXED_8BIT = ("embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection", "router.proj",
              "per_layer_input_gate", "per_layer_projection")


def quantization_plan(model: nn.Module, bits: int, group_size: int, recipe: str = "uniform",
                      mode: str = "affine") -> dict[str, Any]:
    """The `quantization` config entry for a model: defaults plus per-module overrides.

    mode: any of MLX's modes (kernels.products.QUANT_MODES: affine 2-8 bits, mxfp4, mxfp8, nvfp4). The `mixed`
    recipe keeps its sensitive tensors at affine 8 bits (group size 64 under the fp modes, whose groups are
    fixed): finer than mxfp8, whose scales are powers of two."""
    if problem := quant_params_problem(group_size, bits, mode):
        raise ValueError(problem)
    if recipe not in ("uniform", "mixed"):
        raise ValueError(f"recipe must be 'uniform' or 'mixed', got {recipe!r}")
    plan: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": mode, "recipe": recipe}
    eight_bits = {"group_size": group_size if mode == "affine" else 64, "bits": 8}  # no mode: affine
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        rule = eight_bits if recipe == "mixed" and bits < 8 and any(path.endswith(k) for k in MIXED_8BIT) else None
        if not _quantizable(module, (rule or plan)["group_size"]):
            plan[path] = False
        elif rule:
            plan[path] = rule
    return plan


def _quantizable(module: nn.Module, group_size: int) -> bool:
    """Every matrix the module would quantize (a weight, or both expert banks) has whole groups per row."""
    mats = [w for w in (getattr(module, n, None) for n in ("weight", "gate_up_proj", "down_proj")) if w is not None]
    return bool(mats) and all(w.ndim >= 2 and w.shape[-1] % group_size == 0 for w in mats)


def apply_quantization(model: nn.Module, plan: dict[str, Any]) -> None:
    """Swap modules for their quantized versions as the plan says (weights are quantized in place if set)."""
    gs, bits = plan["group_size"], plan["bits"]

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        rule = plan.get(path, True)
        if isinstance(rule, dict):
            return rule  # explicit, towers included (a checkpoint quantized by mlx-vlm, see layouts)
        if rule is False or is_tower_param(path):
            return False  # towers stay in float: small, and their clipped linears need exact bounds
        return _quantizable(module, gs) and {"group_size": gs, "bits": bits, "mode": plan.get("mode", "affine")}

    nn.quantize(model, group_size=gs, bits=bits, class_predicate=predicate)
    use_products(model)
