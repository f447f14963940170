"""Quantize a loaded float model as a plan says, with fitted (optionally activation-weighted) scales and biases.

`quantize_model(model, plan, stats=None)`: the modules are swapped for their MLX quantized versions exactly as
`loading.apply_quantization` does (so the tree, the config entry and the file layout are the usual ones), then every
affine-quantized matrix gets the codes, scales and biases of `affine.quantize` computed from the float weights the
module had, one module at a time (each module's float weights are freed once its quantized tensors exist).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import affine
from .calibrate import InputStats
from .plan import apply_quantization

# The weight matrices of a quantizable module, by the attribute names of its float and quantized versions:
# (float attribute, packed attribute, scales attribute, biases attribute).
LINEAR_TENSORS = [("weight", "weight", "scales", "biases")]
BANK_TENSORS = [(n, n, f"{n}_scales", f"{n}_biases") for n in ("gate_up_proj", "down_proj")]


def quantized_tensors(module: nn.Module) -> list[tuple[str, str, str, str]]:
    return BANK_TENSORS if "gate_up_proj" in module else LINEAR_TENSORS


def bank_spec(qmodule: nn.Module, name: str) -> tuple[int, int, str] | None:
    """(bits, group_size, mode) of one matrix of a quantized module (expert banks have their own, None for a bank
    left in float)."""
    spec = getattr(qmodule, "quantization", None)
    if isinstance(spec, dict) and name in spec:
        s = spec[name]
        return None if s is None else (s.bits, s.group_size, s.mode)
    return qmodule.bits, qmodule.group_size, getattr(qmodule, "mode", "affine")


def importance_of(key: str, name: str, stats: dict[str, InputStats] | None, tied_head: bool) -> mx.array | None:
    """The per-input-channel importance of a module's matrix from calibration stats (None: unweighted)."""
    if not stats:
        return None
    if key.endswith("embed_tokens") and tied_head or key == "lm_head":
        key = "lm_head"  # the tied table is also the LM head, whose input is the final hidden state
    elif name == "down_proj":
        key += ".down_proj"
    if key not in stats:
        return None
    a = stats[key].mean_sq()
    return a[:, None, :] if a.ndim == 2 else a  # per expert: broadcast over each expert's rows


def sub_plan(plan: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The part of a plan under module `prefix`, with paths relative to it."""
    if not prefix:
        return plan
    cut = len(prefix) + 1
    return {k: v for k, v in plan.items() if k in ("group_size", "bits", "mode")} | {
        k[cut:]: v for k, v in plan.items() if k.startswith(prefix + ".")}


def quantize_model(model: nn.Module, plan: dict[str, Any], stats: dict[str, InputStats] | None = None,
                   method: str = "fit", prefix: str = "", tied_head: bool = True) -> None:
    """Quantize the float modules of `model` (or of the submodule at `prefix` of the full model, `plan` and
    `stats` keys being full paths) in place as `plan` (a `quantization` config entry) says.

    method: "fit" (scales and biases fitted to the least squared error, weighted by the calibration `stats` when
    given) or "minmax" (mx.quantize's, what MLX and mlx-lm do). tied_head: the token embedding is also the LM head."""
    if method not in ("fit", "minmax"):
        raise ValueError(f"method must be 'fit' or 'minmax', got {method!r}")
    before = {path: m for path, m in model.named_modules() if hasattr(m, "to_quantized")}
    apply_quantization(model, sub_plan(plan, prefix))
    if method == "minmax":
        return
    after = dict(model.named_modules())
    for path in list(before):
        float_module = before.pop(path)  # the last reference: freed once this module is done
        qmodule = after.get(path)
        if qmodule is None or qmodule is float_module:
            continue  # left in float
        key = f"{prefix}.{path}" if prefix else path
        for name, packed, scales, biases in quantized_tensors(qmodule):
            spec = bank_spec(qmodule, name)
            if spec is None or spec[2] != "affine":
                continue  # a float bank, or a mode other than affine (MLX's own quantization stays)
            bits, group_size, _ = spec
            q, s, b = affine.quantize(float_module[name], group_size, bits,
                                      importance_of(key, name, stats, tied_head), dtype=qmodule[scales].dtype)
            qmodule[packed], qmodule[scales], qmodule[biases] = q, s, b
        mx.eval(qmodule.parameters())
