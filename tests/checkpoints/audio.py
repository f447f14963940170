"""The tiny audio tower (E2B/E4B-like): conformer config, weight randomization, audio checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from .text import MM_TOKEN_IDS, TEXT_VARIANTS, randomize_norms_and_scalars

# Shrunk Gemma4AudioConfig keeping every feature: 2 conformer layers, chunked attention with a short window
# (chunk 4, 5 frames back), a logit cap and gradient-clipping bound small enough to bite, clipped linears.
# subsampling_conv_channels[0] must stay 128: HF sizes input_proj_linear as (c0 // 4) * c1, which only fits the
# 128 mel bins when c0 == 128.
AUDIO_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="silu",
    subsampling_conv_channels=[128, 8],
    conv_kernel_size=5,
    residual_weight=0.5,
    attention_chunk_size=4,
    attention_context_left=6,
    attention_context_right=0,
    attention_logit_cap=1.0,
    attention_invalid_logits_value=-1.0e9,
    use_clipped_linears=True,
    rms_norm_eps=1e-6,
    gradient_clipping=4.0,
    output_proj_dims=24,
    initializer_range=0.1,
)


def tiny_audio_config(**overrides) -> dict:
    """The tiny audio_config dict (pass to Gemma4Config(audio_config=...) or Gemma4AudioConfig(**...))."""
    return dict(AUDIO_CONFIG, **overrides)


def randomize_audio_tower(audio_tower, seed: int = 0, n_frames: int = 96) -> None:
    """Make a transformers Gemma4AudioModel's random weights test-worthy, in place:

    norms 1 + 0.3*randn (randomize_norms_and_scalars), per_dim_scale randn, and finite clip bounds on every
    Gemma4ClippableLinear chosen from one forward pass on random log-mel-like input (the 3rd/97th percentiles
    of each linear's input and output), so that clipping changes a few percent of values everywhere."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    randomize_norms_and_scalars(audio_tower, seed)
    g = torch.Generator().manual_seed(seed + 1)
    seen: dict[str, tuple] = {}
    hooks = []
    with torch.no_grad():
        for name, p in audio_tower.named_parameters():
            if name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=g))
        for name, module in audio_tower.named_modules():
            if isinstance(module, Gemma4ClippableLinear) and module.use_clipped_linears:
                hooks.append(module.linear.register_forward_hook(
                    lambda m, inp, out, name=name: seen.__setitem__(name, (inp[0].detach(), out.detach()))))
        features = torch.randn(1, n_frames, 128, generator=g) * 2.0 - 4.0
        audio_tower(features, torch.ones(1, n_frames, dtype=torch.bool))
        for h in hooks:
            h.remove()
        for name, module in audio_tower.named_modules():
            if name in seen:
                x, y = seen[name]
                module.input_min.fill_(torch.quantile(x.flatten(), 0.03).item())
                module.input_max.fill_(torch.quantile(x.flatten(), 0.97).item())
                module.output_min.fill_(torch.quantile(y.flatten(), 0.03).item())
                module.output_max.fill_(torch.quantile(y.flatten(), 0.97).item())


def make_audio_checkpoint(out_dir: str | os.PathLike, variant: str = "e2b", *, seed: int = 0) -> Path:
    """Save a tiny Gemma4ForConditionalGeneration with the text `variant` and the tiny audio tower (no vision):
    keys `model.language_model.*`, `model.audio_tower.*` (clip bounds included), `model.embed_audio.*`."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    out = Path(out_dir)
    config = Gemma4Config(text_config=TEXT_VARIANTS[variant], vision_config=None, audio_config=tiny_audio_config(),
                          **MM_TOKEN_IDS)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).float().eval()
    randomize_norms_and_scalars(model, seed)
    randomize_audio_tower(model.model.audio_tower, seed)
    model.save_pretrained(out, safe_serialization=True)
    return out

