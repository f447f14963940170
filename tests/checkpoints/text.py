"""Tiny random Gemma 4 (and Gemma 3) text checkpoints, written by transformers in the exact Hugging Face layout.

Each variant's config is shrunk but keeps every feature of the published model it mimics:

  e2b   PLE, 4:1 sliding:full pattern, KV-shared final layers, double-wide MLP on shared layers
  e4b   PLE, 5:1 pattern, KV sharing, 2 KV heads
  26b   MoE (top-8 of 16 experts + dense shared MLP), k=v on full layers, own global KV heads/head dim,
        bidirectional vision attention
  31b   dense, k=v on full layers, global KV heads/head dim, bidirectional vision attention

Sliding windows are tiny (8-16) so test prompts exceed them several times. Norm weights and scalars are
set to 1 + 0.3*randn so a forgotten one changes the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VOCAB = 512
# Multimodal marker/placeholder ids inside the tiny vocabulary (the real ones are 255999..258884).
MM_TOKEN_IDS = dict(boi_token_id=500, eoi_token_id=501, image_token_id=502, video_token_id=503, boa_token_id=504,
                    eoa_token_index=505, audio_token_id=506)

# Shared tiny text dimensions; variants override.
_BASE_TEXT = dict(
    vocab_size=VOCAB,
    vocab_size_per_layer_input=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)


def _pattern(n_layers: int, every: int) -> list[str]:
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]


TEXT_VARIANTS: dict[str, dict] = {
    "e2b": dict(
        _BASE_TEXT,
        num_hidden_layers=10,
        layer_types=_pattern(10, 5),
        num_key_value_heads=1,
        sliding_window=8,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=4,
        use_double_wide_mlp=True,
    ),
    "e4b": dict(
        _BASE_TEXT,
        num_hidden_layers=12,
        layer_types=_pattern(12, 6),
        num_key_value_heads=2,
        sliding_window=8,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=4,
    ),
    "26b": dict(
        _BASE_TEXT,
        num_hidden_layers=6,
        layer_types=_pattern(6, 6),
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=16,
        top_k_experts=8,
        moe_intermediate_size=32,
        intermediate_size=48,
        use_bidirectional_attention="vision",
    ),
    "31b": dict(
        _BASE_TEXT,
        num_hidden_layers=6,
        layer_types=_pattern(6, 3),
        num_attention_heads=8,
        num_key_value_heads=4,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=12,
        hidden_size_per_layer_input=0,
        use_bidirectional_attention="vision",
    ),
}


def randomize_norms_and_scalars(model, seed: int = 0) -> None:
    """Set every norm weight, layer_scalar and router scale to 1 + 0.3*randn (transformers inits them to 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            is_norm = "norm" in parent and leaf == "weight"
            is_scalar = leaf in ("layer_scalar", "per_expert_scale", "scale") or (
                parent == "router" and leaf == "scale"
            )
            if is_norm or is_scalar:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def _to_published_spelling(config_path: Path) -> None:
    """Rewrite a transformers-5.2x `per_layer_config` into Google's `global_head_dim` keys."""

    def fix(text: dict) -> None:
        plc = text.pop("per_layer_config", None) or {}
        overrides = next(iter(plc.values()), {})
        text["global_head_dim"] = overrides.get("head_dim", text.get("head_dim"))
        text["num_global_key_value_heads"] = overrides.get("num_key_value_heads")

    cfg = json.loads(config_path.read_text())
    fix(cfg["text_config"] if "text_config" in cfg else cfg)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_text_checkpoint(out_dir: str | os.PathLike, variant: str, *, spelling: str = "per_layer_config",
                         wrapper: str = "causal_lm", seed: int = 0, extra: dict | None = None) -> Path:
    """Save a tiny random text checkpoint of `variant` into out_dir (safetensors + config.json).

    wrapper: "causal_lm" (Gemma4ForCausalLM, keys `model.*`) or "conditional" (Gemma4ForConditionalGeneration
    without towers, keys `model.language_model.*`). spelling: "per_layer_config" or "published"."""
    import torch
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    out = Path(out_dir)
    torch.manual_seed(seed)
    text_kwargs = dict(TEXT_VARIANTS[variant], **(extra or {}))
    text_config = Gemma4TextConfig(**text_kwargs)
    if wrapper == "causal_lm":
        model = Gemma4ForCausalLM(text_config)
    else:
        config = Gemma4Config(text_config=text_config.to_dict(), vision_config=None, audio_config=None)
        model = Gemma4ForConditionalGeneration(config)
    model = model.float().eval()
    randomize_norms_and_scalars(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    if spelling == "published":
        _to_published_spelling(out / "config.json")
    return out


def load_hf(path, dtype=None):
    """Load a test checkpoint with transformers (eager attention, float32) as the oracle."""
    import torch
    from transformers import AutoConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    cfg = AutoConfig.from_pretrained(path)
    cls = Gemma4ForConditionalGeneration if cfg.model_type == "gemma4" else Gemma4ForCausalLM
    model = cls.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="eager")
    return model.eval()


# ---- Gemma 3 text (the subset of Gemma 4's decoder that real offline weights use) -----------------

GEMMA3_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
    layer_types=_pattern(7, 6), rope_theta=1000000.0, rope_local_base_freq=10000.0,
    final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    max_position_embeddings=4096, tie_word_embeddings=True,
)


def make_gemma3_checkpoint(out_dir: str | os.PathLike, seed: int = 0, extra: dict | None = None) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**dict(GEMMA3_TEXT, **(extra or {})))).float().eval()
    # Gemma 3 norms multiply by (1 + w): transformers inits w = 0, so set w = 0.3*randn for the same effect.
    randomize_norms_and_scalars(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.sub_(1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def load_hf_gemma3(path):
    import torch
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
