"""Tiny random Gemma 4 checkpoints, written by transformers in the exact Hugging Face layout.

This is the one place test checkpoints are made; every test module shares it (see conftest.py).
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

import functools
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


# ==========================================================================================================
# Audio tower (E2B/E4B-like): tiny conformer config + weight randomization for multimodal checkpoints
# ==========================================================================================================

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


# ==================================================================================================
# Vision towers (vision helper). Tiny `vision_config` dicts for Gemma4ForConditionalGeneration:
#   small  like E2B/E4B's tower: clipped linears (bounds set to finite, active values by calibration)
#   large  like 26B/31B's tower: `standardize` (random std_bias / std_scale), head_dim 24 (72-like: not 2^k)
# Patch size and pooling stay at the published 16 / 3 so real processor outputs feed them.
# Use: Gemma4Config(text_config=TEXT_VARIANTS[v], vision_config=vision_config("small"), audio_config=None),
# then randomize_vision_tower(model, seed) after randomize_norms_and_scalars; or make_multimodal_model(...).
# ==================================================================================================

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
                          audio: bool = False, text_extra: dict | None = None):
    """A tiny random Gemma4ForConditionalGeneration (text + vision tower, + the audio tower if asked), float32,
    eval mode, with the multimodal token ids inside the tiny vocabulary."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    text_config = Gemma4TextConfig(**dict(TEXT_VARIANTS[text_variant], **(text_extra or {}))).to_dict()
    config = Gemma4Config(text_config=text_config,
                          vision_config=vision_config(vision_variant or VISION_FOR_TEXT[text_variant]),
                          audio_config=tiny_audio_config() if audio else None, **MM_TOKEN_IDS)
    model = Gemma4ForConditionalGeneration(config).float().eval()
    randomize_norms_and_scalars(model, seed)
    randomize_vision_tower(model, seed)
    if audio:
        randomize_audio_tower(model.model.audio_tower, seed)
    return model


def make_multimodal_checkpoint(out_dir: str | os.PathLike, text_variant: str, vision_variant: str | None = None,
                               seed: int = 0, *, audio: bool = False, text_extra: dict | None = None) -> Path:
    """Save make_multimodal_model(...) into out_dir (keys model.language_model.*, model.vision_tower.*,
    model.embed_vision.*)."""
    out = Path(out_dir)
    make_multimodal_model(text_variant, vision_variant, seed, audio=audio, text_extra=text_extra).save_pretrained(
        out, safe_serialization=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers (generation helper). A byte-fallback BPE in Gemma's SentencePiece style (space -> "▁", bytes as
# "<0xNN>") with every Gemma 4 control token that fits at its published id; the rest are ASCII characters, a few
# merges and "<unusedN>" fillers up to vocab_size.
# ---------------------------------------------------------------------------------------------------------------

_MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
           ("▁", "a"), ("▁", "w"), ("o", "r"), ("e", "n"), ("l", "l"), ("▁", "s"), ("s", "t"), ("▁", "i"),
           ("▁", "h"), ("e", "l"), ("el", "l"), ("ell", "o"), ("▁h", "ello"), ("▁w", "or"), ("▁wor", "l"),
           ("▁worl", "d"), ("▁", "c"), ("▁", "b"), ("▁", "o"), ("▁", "f"), ("▁", "m"), ("a", "t"), ("▁", "p"),
           ("i", "t"), ("▁", "d"), ("▁", "1"), ("▁", "2"), ("▁", "n")]


_MM_TOKEN_TEXT = {"boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
                  "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>",
                  "audio_token_id": "<|audio|>"}


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = VOCAB, *, with_template: bool = True,
                   multimodal_ids: dict | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja: the package's built-in Gemma 4
    template) into out_dir. Control tokens whose published id is >= vocab_size are left out, unless
    multimodal_ids (like MM_TOKEN_IDS) places the image/audio ones at the tiny checkpoints' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    specials = json.loads((Path(__file__).resolve().parent.parent / "mlx_gemma4" / "presets"
                           / "special_tokens.json").read_text())["tokens"]
    fixed = {tok["id"]: tok["content"] for tok in specials.values() if tok["id"] < vocab_size}
    for key, tid in (multimodal_ids or {}).items():
        fixed[tid] = _MM_TOKEN_TEXT[key]
    fixed[107] = "\n"
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += ["".join(pair) for pair in _MERGES]
    vocab: dict[str, int] = {}
    free = (i for i in range(vocab_size) if i not in fixed)
    for piece in pieces:
        vocab[piece] = next(free)
    for i in range(vocab_size):
        if i in fixed:
            vocab[fixed[i]] = i
    for i in free:
        vocab[f"<unused{i}>"] = i
    assert len(vocab) == vocab_size, "vocab_size too small for bytes + characters + control tokens"

    tok = Tokenizer(BPE(vocab=vocab, merges=list(_MERGES), unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False)
                            for i, text in sorted(fixed.items()) if i != 107])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "mask_token": "<mask>", "add_bos_token": False, "padding_side": "left",
              "tokenizer_class": "GemmaTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if with_template:
        template = Path(__file__).resolve().parent.parent / "mlx_gemma4" / "templates" / "gemma4.jinja"
        (out / "chat_template.jinja").write_text(template.read_text())
    return out


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(directory: str):
    return _make_hf_tokenizer(Path(directory))


def load_hf_tokenizer(directory):
    """transformers' fast tokenizer over the same files (the reference for chat-template rendering); cached."""
    return _hf_tokenizer(str(directory))


def _make_hf_tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    template = directory / "chat_template.jinja"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>",
        chat_template=template.read_text() if template.is_file() else None)


# ---------------------------------------------------------------------------------------------------------------
# GGUF checkpoints (gguf helper): a make_text_checkpoint() checkpoint rewritten as a llama.cpp `gemma4` GGUF,
# the way llama.cpp's convert_hf_to_gguf.py (Gemma4Model) writes one: llama.cpp tensor names from the gguf
# package's own name map, ggml dimension order, the metadata keys llama.cpp reads, and a tiny "gemma4" BPE
# tokenizer.
# ---------------------------------------------------------------------------------------------------------------

# Tiny ranked-BPE vocabulary for the synthetic GGUFs: specials, 256 byte tokens, characters, a few merges.
GGUF_MERGES = [("h", "e"), ("▁", "t"), ("a", "t"), ("▁t", "he"), ("c", "at"), ("▁", "cat"), ("s", "at"), ("▁", "sat")]


def gguf_test_vocab(size: int = VOCAB) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """(tokens, token types, merges) of a small Gemma-4-style tokenizer padded with <unusedN> to `size`."""
    from gguf.constants import TokenType

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens = list(specials)
    types = [TokenType.CONTROL] * len(specials)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    chars = ["▁", "\n"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("ABCDEFGHIJ0123456789.,!?")
    merged = [a + b for a, b in GGUF_MERGES]
    tokens += chars + merged + ["\n\n"]
    types += [TokenType.NORMAL] * (len(chars) + len(merged) + 1)
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(TokenType.CONTROL)
    return tokens, [int(t) for t in types], list(GGUF_MERGES)


def make_gemma4_gguf(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike,
                     tensor_type: str = "F32", split_experts: bool = False) -> Path:
    """Write the Gemma4ForCausalLM checkpoint in checkpoint_dir as a llama.cpp gemma4 GGUF file.

    tensor_type: "F32", "F16", "BF16" or "Q8_0" for the weight matrices (norms, scalars and rows that are not a
    whole number of quantization blocks stay F32, as llama.cpp's converter does). split_experts: store the MoE
    gate/up banks as separate ffn_gate_exps/ffn_up_exps tensors (which llama.cpp also reads)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if "per_layer_config" in cfg or "global_head_dim" not in cfg:
        raise ValueError("make_gemma4_gguf needs a checkpoint written with spelling='published'")
    weights = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    n_layers = cfg["num_hidden_layers"]
    swa = [t == "sliding_attention" for t in cfg["layer_types"]]

    out_path = Path(out_path)
    w = gguf.GGUFWriter(str(out_path), arch="gemma4")
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(cfg["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_sliding_window_pattern(swa)
    w.add_shared_kv_layers(cfg["num_kv_shared_layers"])
    w.add_embedding_length_per_layer_input(cfg["hidden_size_per_layer_input"] or 0)
    w.add_key_length(cfg["global_head_dim"])
    w.add_value_length(cfg["global_head_dim"])
    w.add_key_length_swa(cfg["head_dim"])
    w.add_value_length_swa(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["global_head_dim"])
    w.add_rope_dimension_count_swa(cfg["head_dim"])
    n_ff = cfg["intermediate_size"]
    if cfg.get("use_double_wide_mlp"):
        first_shared = n_layers - cfg["num_kv_shared_layers"]
        w.add_feed_forward_length([n_ff if i < first_shared else 2 * n_ff for i in range(n_layers)])
    else:
        w.add_feed_forward_length(n_ff)
    if cfg.get("num_global_key_value_heads") is not None:
        w.add_head_count_kv([cfg["num_key_value_heads"] if s else cfg["num_global_key_value_heads"] for s in swa])
    else:
        w.add_head_count_kv(cfg["num_key_value_heads"])
    if cfg.get("enable_moe_block"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["top_k_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])

    tokens, types, merges = gguf_test_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)

    # "proportional" RoPE on full layers: frequency factor 1 on rotated pairs, 1e30 (no rotation) on the rest
    full = cfg["rope_parameters"]["full_attention"]
    n_rot_pairs = int(cfg["global_head_dim"] * full["partial_rotary_factor"] / 2)
    rope_freqs = np.array([1.0] * n_rot_pairs + [1e30] * (cfg["global_head_dim"] // 2 - n_rot_pairs), np.float32)
    w.add_tensor("rope_freqs.weight", rope_freqs)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layers)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for hf_name, value in list(weights.items()):
        if split_experts and hf_name.endswith("experts.gate_up_proj"):
            gate, up = np.split(weights.pop(hf_name), 2, axis=1)
            weights[hf_name.replace("gate_up_proj", "gate_proj")] = gate
            weights[hf_name.replace("gate_up_proj", "up_proj")] = up
    for hf_name, value in weights.items():
        value = value.astype(np.float32)
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith(("experts.gate_proj", "experts.up_proj")):
            part = "gate" if hf_name.endswith("gate_proj") else "up"
            w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", value)
            continue
        if hf_name.endswith("router.scale"):
            name = f"blk.{layer}.ffn_gate_inp.scale"
        elif hf_name.endswith("router.per_expert_scale"):
            name = f"blk.{layer}.ffn_down_exps.scale"
        else:
            if hf_name.endswith(("layer_scalar", "experts.gate_up_proj", "experts.down_proj")):
                hf_name += ".weight"
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if name is None:
                raise ValueError(f"no llama.cpp name for {hf_name}")
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if value.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32 and value.shape[-1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
