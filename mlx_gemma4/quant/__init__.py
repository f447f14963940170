"""Quantization quality: fitted affine scales (`affine`), calibration statistics (`calibrate`), AWQ scaling
(`awq`), sensitivity-based bit allocation (`sensitivity`, `budget`) and the recipes that combine them (`recipes`).
Everything writes MLX's affine format."""

from .budget import bits_per_weight
from .recipes import RECIPES, Recipe, as_recipe, quantize

__all__ = ["RECIPES", "Recipe", "as_recipe", "bits_per_weight", "quantize"]
