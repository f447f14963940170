"""Tiny vision towers and the multimodal (text + vision [+ audio]) checkpoints.

Tiny `vision_config` dicts for Gemma4ForConditionalGeneration:
  small  like E2B/E4B's tower: clipped linears (bounds set to finite, active values by calibration)
  large  like 26B/31B's tower: `standardize` (random std_bias / std_scale), head_dim 24 (72-like: not 2^k)
Patch size and pooling stay at the published 16 / 3 so real processor outputs feed them.
Use: Gemma4Config(text_config=TEXT_VARIANTS[v], vision_config=vision_config("small"), audio_config=None),
then randomize_vision_tower(model, seed) after randomize_norms_and_scalars; or make_multimodal_model(...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .audio import randomize_audio_tower, tiny_audio_config
from .text import MM_TOKEN_IDS, TEXT_VARIANTS, randomize_norms_and_scalars

_BASE_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},  # the published spelling
    pooling_kernel_size=3,
    patch_size=16,
    position_embedding_size=1024,  # > 3 * 280 patches along a 1xN strip at the 280 budget
    default_output_length=280,
)

VISION_VARIANTS: dict[str, dict] = {
    "small": dict(_BASE_VISION, use_clipped_linears=True, standardize=False),
    "large": dict(_BASE_VISION, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=24, use_clipped_linears=False, standardize=True),
}

# Which tower each text variant carries in the published models.
VISION_FOR_TEXT = {"e2b": "small", "e4b": "small", "26b": "large", "31b": "large"}


def vision_config(variant: str) -> dict:
    """A fresh copy of the tiny vision_config dict of `variant` ("small" or "large")."""
    return json.loads(json.dumps(VISION_VARIANTS[variant]))


def calibration_images(seed: int = 0, budget: int = 70):
    """(pixel_values, position_ids) torch tensors of two noisy gradient pictures made by transformers'
    Pillow image processor: a batch for setting clip bounds."""
    import numpy as np
    import torch
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((120, 200), (260, 90)):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        rgb = np.stack([255 * x, 255 * y, 128 + 60 * np.sin(20 * x * y)], -1) + rng.normal(0, 25, (h, w, 3))
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    out = Gemma4ImageProcessorPil()(images, max_soft_tokens=budget)
    return torch.tensor(np.asarray(out["pixel_values"])), torch.tensor(np.asarray(out["image_position_ids"]))


def randomize_vision_tower(model, seed: int = 0) -> None:
    """Give the vision tower's init-constant tensors random values so a forgotten one shows.

    position_embedding_table (init 1) -> randn; std_bias -> 0.5*randn, std_scale -> 1 + 0.3*randn;
    clipped-linear bounds (init +-inf) -> finite: each bound is the 10th/90th percentile of the values that
    linear sees on `calibration_images()`, so clipping really happens on pictures. `model` is a
    Gemma4ForConditionalGeneration, Gemma4Model or Gemma4VisionModel."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear, Gemma4VisionModel

    tower = next(m for m in model.modules() if isinstance(m, Gemma4VisionModel))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        table = tower.patch_embedder.position_embedding_table
        table.copy_(torch.randn(table.shape, generator=g))
        if tower.config.standardize:
            tower.std_bias.copy_(0.5 * torch.randn(tower.std_bias.shape, generator=g))
            tower.std_scale.copy_(1.0 + 0.3 * torch.randn(tower.std_scale.shape, generator=g))
        clipped = [m for m in tower.modules() if isinstance(m, Gemma4ClippableLinear) and m.use_clipped_linears]
        if not clipped:
            return
        seen: dict = {}
        hooks = [m.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod, (args[0], out)))
                 for m in clipped]
        try:
            pixel_values, position_ids = calibration_images(seed)
            tower(pixel_values=pixel_values, pixel_position_ids=position_ids)
        finally:
            for h in hooks:
                h.remove()
        for m in clipped:
            x, y = (t.detach().flatten().float() for t in seen[m])
            m.input_min.fill_(torch.quantile(x, 0.1).item())
            m.input_max.fill_(torch.quantile(x, 0.9).item())
            m.output_min.fill_(torch.quantile(y, 0.1).item())
            m.output_max.fill_(torch.quantile(y, 0.9).item())


def make_multimodal_model(text_variant: str, vision_variant: str | None = None, seed: int = 0, *,
                          audio: bool = False, text_extra: dict | None = None, audio_extra: dict | None = None):
    """A tiny random Gemma4ForConditionalGeneration (text + vision tower, + the audio tower if asked), float32,
    eval mode, with the multimodal token ids inside the tiny vocabulary."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    text_config = Gemma4TextConfig(**dict(TEXT_VARIANTS[text_variant], **(text_extra or {}))).to_dict()
    config = Gemma4Config(text_config=text_config,
                          vision_config=vision_config(vision_variant or VISION_FOR_TEXT[text_variant]),
                          audio_config=tiny_audio_config(**(audio_extra or {})) if audio else None, **MM_TOKEN_IDS)
    model = Gemma4ForConditionalGeneration(config).float().eval()
    randomize_norms_and_scalars(model, seed)
    randomize_vision_tower(model, seed)
    if audio:
        randomize_audio_tower(model.model.audio_tower, seed)
    return model


def make_multimodal_checkpoint(out_dir: str | os.PathLike, text_variant: str, vision_variant: str | None = None,
                               seed: int = 0, *, audio: bool = False, text_extra: dict | None = None,
                               audio_extra: dict | None = None) -> Path:
    """Save make_multimodal_model(...) into out_dir (keys model.language_model.*, model.vision_tower.*,
    model.embed_vision.*)."""
    out = Path(out_dir)
    make_multimodal_model(text_variant, vision_variant, seed, audio=audio, text_extra=text_extra,
                          audio_extra=audio_extra).save_pretrained(out, safe_serialization=True)
    return out

