"""Quantization recipes: which matrices get how many bits, and how their scales and biases are chosen.

    load(path, quantize=4, recipe="mixed")                          # a named recipe
    load(path, quantize=4, recipe=Recipe("dynamic", target_bpw=5))  # or a Recipe

Allocation (`Recipe.allocation`):
  uniform   every eligible matrix at `bits`
  mixed     the tensors 4 bits hurts most at 8 bits (`quant.plan.MIXED_8BIT`: token/PLE embeddings, PLE projection
            and gates, the MoE router), the rest at `bits`
  dynamic   mixed, then the decoder matrices whose quantization moves their layer's output most are raised to 6
            or 8 bits while the whole model stays within `target_bpw` bits per weight (default: mixed's + 0.5)
Scales and biases: fitted per group to the least squared error (`affine`), weighted by the activations of a
calibration text (`calibration`: None for the shipped text, or a text file; `calibration=False` fits unweighted,
without running the model). `awq=True` also folds AWQ per-channel scales into the norms/linears before quantizing
(`awq`). `method="minmax"` is MLX's own min/max quantization (what mlx-lm's convert does), for comparison.

Calibrated recipes run the float model once over the calibration tokens (one batch); each decoder layer is quantized
right after its forward, so its float weights are freed before the next layer's are read (`dynamic` keeps them all
until the allocation is known). Checkpoints are MLX's affine format whatever the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import awq, budget, calibrate, sensitivity
from .apply import quantize_model
from .plan import quantization_plan

ALLOCATIONS = ("uniform", "mixed", "dynamic")
HIGH_BITS = (6, 8)  # what `dynamic` may raise a decoder matrix to


@dataclass(frozen=True)
class Recipe:
    allocation: str = "uniform"
    calibration: str | Path | bool | None = None  # None: the shipped text; a file; False: no calibration
    awq: bool = False
    method: str = "fit"  # "fit" or "minmax"
    target_bpw: float | None = None  # dynamic only: bits per weight of the whole model (embeddings counted)
    calibration_tokens: int = 2048  # at most this many calibration tokens (rows of 512)

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"recipe allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.method not in ("fit", "minmax"):
            raise ValueError(f"recipe method must be 'fit' or 'minmax', got {self.method!r}")
        if self.method == "minmax" and (self.awq or self.allocation == "dynamic"):
            raise ValueError("awq and dynamic recipes fit their scales: they need method='fit'")
        if self.target_bpw is not None and self.allocation != "dynamic":
            raise ValueError("target_bpw only applies to the dynamic recipe")
        if self.calibration is False and (self.awq or self.allocation == "dynamic"):
            raise ValueError("awq and dynamic recipes need a calibration text (calibration=False turns it off)")

    @property
    def calibrated(self) -> bool:
        return self.method == "fit" and self.calibration is not False

    @property
    def name(self) -> str:
        extras = [x for x, on in (("awq", self.awq), ("minmax", self.method == "minmax"),
                                  ("uncalibrated", self.method == "fit" and self.calibration is False)) if on]
        return "+".join([self.allocation, *extras])


# Named recipes (`--recipe` on the command lines, `load(recipe=...)`).
RECIPES = {
    "uniform": Recipe("uniform"),
    "mixed": Recipe("mixed"),
    "dynamic": Recipe("dynamic"),
    "awq": Recipe("mixed", awq=True),
    "minmax": Recipe("uniform", method="minmax"),
    "mixed-minmax": Recipe("mixed", method="minmax"),
}


def as_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r} (known: {', '.join(RECIPES)})")
    return RECIPES[recipe]


def quantize(model: nn.Module, bits: int, group_size: int = 64, recipe: str | Recipe = "uniform",
             processor=None, mode: str = "affine") -> dict[str, Any]:
    """Quantize a loaded float model in place; returns the `quantization` config entry (the plan).

    processor: tokenizes the calibration text (without one, calibrated recipes fall back to unweighted fits;
    awq/dynamic raise). mode: MLX's quantization mode; the fp modes (mxfp4, mxfp8, nvfp4) are MLX's own
    quantization (only the affine tensors a mixed recipe keeps at 8 bits are fitted, unweighted)."""
    r = as_recipe(recipe)
    if mode != "affine" and (r.awq or r.allocation == "dynamic"):
        raise ValueError(f"the {r.name} recipe fits affine scales: it needs mode='affine', got {mode!r}")
    plan = quantization_plan(model, bits, group_size, "uniform" if r.allocation == "uniform" else "mixed", mode)
    plan["recipe"] = r.name
    if not r.calibrated or mode != "affine" or bits >= 8 and r.allocation != "dynamic":
        quantize_model(model, plan, None, r.method, tied_head="lm_head" not in model)
        return plan
    if processor is None:
        if r.awq or r.allocation == "dynamic":
            raise ValueError(f"the {r.name} recipe needs the model's tokenizer for its calibration text")
        plan["recipe"] = replace(r, calibration=False).name
        quantize_model(model, plan, None, r.method, tied_head="lm_head" not in model)
        return plan
    text = calibrate.calibration_text(None if r.calibration is True else r.calibration)
    tokens = calibrate.calibration_batches(processor, text, max_tokens=r.calibration_tokens)
    return _calibrated(model, plan, tokens, r, bits, group_size)


def _calibrated(model, plan, tokens, r: Recipe, bits: int, group_size: int) -> dict[str, Any]:
    """One forward pass over the calibration batch; each decoder layer is scaled (awq) and quantized (or, for
    dynamic, measured) right after its own forward."""
    modules = dict(model.named_modules())
    leaves = {p: m for p, m in modules.items() if hasattr(m, "to_quantized") and p.startswith("language_model.")}
    layers = {f"language_model.layers.{i}": layer for i, layer in enumerate(model.language_model.layers)}
    stats: dict[str, calibrate.InputStats] = {}
    errors: dict[str, float] = {}
    record = calibrate.recorder(stats)
    tied = "lm_head" not in model

    def layer_done(prefix, layer, args, out):
        mx.eval(out)
        if r.awq:
            awq.scale_layer(layer, prefix, stats, bits, group_size)
        if r.allocation == "dynamic":
            errors.update(sensitivity.layer_errors(layer, prefix, args, out, plan, stats))
        else:
            quantize_model(layer, plan, stats, r.method, prefix=prefix)

    with calibrate.observe(leaves, before=record), calibrate.observe(layers, after=layer_done):
        record.add("lm_head", calibrate.input_stats(model.language_model(tokens)))
    if r.allocation == "dynamic":
        target = r.target_bpw or budget.plan_bits_per_weight(model, plan) + 0.5
        plan.update(budget.allocate(model, plan, errors, target, HIGH_BITS))
    quantize_model(model, plan, stats, r.method, tied_head=tied)
    return plan
