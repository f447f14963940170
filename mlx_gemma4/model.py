"""The top-level Gemma 4 model: text decoder, LM head with soft-capping, and (when the checkpoint has them)
the vision and audio towers whose soft tokens replace the placeholder tokens of the prompt.

`model(input_ids, cache=...) -> logits (B, L, vocab)`; with images/audio,
`model.prepare_inputs(input_ids, pixel_values=..., ...)` first (names as transformers' processor outputs),
then `model(**inputs.span(a, b), cache=cache)` chunk by chunk (`inputs.chunks(size)` never splits an image).
Reference: `Gemma4Model.forward`, `Gemma4ForConditionalGeneration`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .multimodal import MultimodalEmbedder
from .text import TextModel


# Gemma4's parameter groups outside the text decoder: the vision/audio towers and their embedders
# (vision_embedder: the 12B's encoder-free image front end).
TOWERS = ("vision_tower", "vision_embedder", "embed_vision", "audio_tower", "embed_audio")


def is_tower_param(name: str) -> bool:
    """Whether a parameter name (ours, or Hugging Face's `model.`-prefixed one) belongs to a tower."""
    return name.removeprefix("model.").split(".", 1)[0] in TOWERS


@dataclass
class PreparedInputs:
    """A prompt ready for the decoder: ids for the PLE lookup (placeholders replaced by pad), merged
    embeddings (None for text-only prompts) and image-block ids for the bidirectional vision mask."""

    input_ids: mx.array  # (1, L)
    inputs_embeds: mx.array | None = None  # (1, L, H)
    block_ids: np.ndarray | None = None  # (L,) int32, -1 = not an image/video soft token

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def span(self, start: int, end: int) -> dict:
        """Keyword arguments for `model(...)` covering prompt positions [start, end)."""
        out = {"input_ids": self.input_ids[:, start:end]}
        if self.inputs_embeds is not None:
            out["inputs_embeds"] = self.inputs_embeds[:, start:end]
        if self.block_ids is not None:
            out["block_ids"] = mx.array(self.block_ids[start:end])
        return out

    def chunks(self, size: int) -> list[tuple[int, int]]:
        """Spans of about `size` tokens; a chunk boundary never falls inside an image block (tokens of one
        image attend to each other bidirectionally, so they must be in the same forward step)."""
        spans, start, L = [], 0, self.length
        while start < L:
            end = min(start + size, L)
            if self.block_ids is not None and end < L:
                b = self.block_ids
                while end < L and b[end] >= 0 and b[end] == b[end - 1]:
                    end += 1
            spans.append((start, end))
            start = end
        return spans


def vision_block_ids(ids: np.ndarray, vision_token_ids: list[int]) -> np.ndarray:
    """Runs of consecutive image/video soft tokens numbered 0, 1, ...; -1 elsewhere
    (transformers' get_block_sequence_ids_for_mask over mm_token_type_ids 1 and 2)."""
    is_vision = np.isin(ids, vision_token_ids)
    starts = is_vision & ~np.concatenate([[False], is_vision[:-1]])
    return np.where(is_vision, np.cumsum(starts) - 1, -1).astype(np.int32)


class Gemma4(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text
        self.policy = None  # the RuntimePolicy load() gives the model (mlx_gemma4.runtime), applied in __call__
        self.language_model = TextModel(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        placeholders = [t for t in (config.image_token_id, config.video_token_id, config.audio_token_id)
                        if t is not None and config.model_type in ("gemma4", "gemma4_unified")]
        self._placeholder_ids = mx.array(placeholders) if placeholders else None
        if config.model_type == "gemma4_unified":
            self._build_unified_front_ends(config)
        else:
            self._build_towers(config)

    def _build_towers(self, config: ModelConfig) -> None:
        """Vision / audio towers and their projections (E2B, E4B, 26B, 31B)."""
        H = config.text.hidden_size
        if config.vision is not None:
            from .vision import VisionConfig, VisionTower

            vc = VisionConfig.from_dict(config.vision)
            self.vision_tower = VisionTower(vc)
            self.embed_vision = MultimodalEmbedder(vc.hidden_size, H, vc.rms_norm_eps)
        if config.audio is not None:
            from .audio import AudioConfig, AudioTower

            ac = AudioConfig.from_dict(config.audio)
            self.audio_tower = AudioTower(ac)
            self.embed_audio = MultimodalEmbedder(ac.output_proj_dims, H, ac.rms_norm_eps)

    def _build_unified_front_ends(self, config: ModelConfig) -> None:
        """The 12B's encoder-free embedders (no towers): mlx_gemma4.unified."""
        from .unified import UnifiedAudioConfig, UnifiedVisionConfig, VisionEmbedder

        H = config.text.hidden_size
        if config.vision is not None:
            vc = UnifiedVisionConfig.from_dict(config.vision)
            self.vision_embedder = VisionEmbedder(vc)
            self.embed_vision = MultimodalEmbedder(vc.output_proj_dims, H, vc.rms_norm_eps)
        if config.audio is not None:
            ac = UnifiedAudioConfig.from_dict(config.audio)
            self.embed_audio = MultimodalEmbedder(ac.audio_embed_dim, H, ac.rms_norm_eps)

    # ---- multimodal inputs --------------------------------------------------------------------
    def image_features(self, pixel_values, position_ids) -> mx.array:
        """Soft-token embeddings (N, H) of a batch of processed images, in prompt order."""
        if "vision_tower" in self:
            return self.embed_vision(self.vision_tower(mx.array(pixel_values), mx.array(position_ids)))
        if "vision_embedder" in self:  # encoder-free (gemma4_unified)
            return self.embed_vision(self.vision_embedder(pixel_values, position_ids))
        raise ValueError("this checkpoint has no vision tower: images are not supported")

    def audio_features(self, features, mask) -> mx.array:
        """Soft-token embeddings (N, H) of a batch of audio clips; padding frames dropped."""
        if "audio_tower" in self:
            from .audio import audio_soft_tokens

            return audio_soft_tokens(self.audio_tower, self.embed_audio, mx.array(features), mx.array(mask))
        if "embed_audio" in self:  # encoder-free (gemma4_unified): raw waveform frames
            from .unified import audio_soft_tokens

            return audio_soft_tokens(self.embed_audio, features, mask)
        raise ValueError("this checkpoint has no audio tower: audio input is not supported")

    def prepare_inputs(self, input_ids, pixel_values=None, image_position_ids=None, input_features=None,
                       input_features_mask=None, pixel_values_videos=None, video_position_ids=None,
                       **unused) -> PreparedInputs:
        """Embed a (1, L) prompt and put image/video/audio soft tokens where their placeholders are."""
        ids = self.check_ids(input_ids)
        if ids.shape[0] != 1:
            raise ValueError("multimodal prompts are processed one at a time (batch size 1)")
        cfg = self.config
        host = np.array(ids[0])
        placeholders = {"image": cfg.image_token_id, "video": cfg.video_token_id, "audio": cfg.audio_token_id}
        features = {
            "image": (pixel_values, lambda: self.image_features(pixel_values, image_position_ids)),
            "video": (pixel_values_videos, lambda: self.image_features(pixel_values_videos, video_position_ids)),
            "audio": (input_features, lambda: self.audio_features(input_features, input_features_mask)),
        }
        mm_ids = [t for t in placeholders.values() if t is not None]
        is_mm = np.isin(host, mm_ids)
        if not is_mm.any() and all(v is None for v, _ in features.values()):
            return PreparedInputs(ids)
        ple_ids = mx.array(np.where(is_mm, cfg.text.pad_token_id, host)[None].astype(np.int32))
        embeds = self.language_model.embed(ple_ids)
        for kind, (given, compute) in features.items():
            token = placeholders[kind]
            positions = np.flatnonzero(host == token) if token is not None else np.array([], int)
            if given is None:
                if len(positions):
                    raise ValueError(f"the prompt has {len(positions)} {kind} placeholder tokens but no {kind} "
                                     "input was given")
                continue
            soft = compute()
            if soft.shape[0] != len(positions):
                raise ValueError(f"{kind} features and placeholders do not match: {soft.shape[0]} soft tokens "
                                 f"from the {kind} input(s), {len(positions)} {kind} tokens in the prompt")
            embeds[0, mx.array(positions)] = soft.astype(embeds.dtype)
        block_ids = None
        if cfg.text.use_bidirectional_attention == "vision":
            block_ids = vision_block_ids(host, [t for t in (cfg.image_token_id, cfg.video_token_id) if t is not None])
            if (block_ids < 0).all():
                block_ids = None
        return PreparedInputs(ple_ids, embeds, block_ids)

    # ---- text ---------------------------------------------------------------------------------
    def logits(self, h: mx.array) -> mx.array:
        out = self.lm_head(h) if "lm_head" in self else self.language_model.embed_tokens.as_linear(h)
        cap = self.text_config.final_logit_softcapping
        if cap:
            out = mx.tanh(out / cap) * cap
        return out

    def __call__(self, input_ids: mx.array, cache=None, *, inputs_embeds: mx.array | None = None,
                 block_ids: mx.array | None = None, last_only: bool = False, return_hidden: bool = False):
        """Logits (B, L, V); with return_hidden, (logits, final-normed hidden states (B, L, H)), which the MTP
        drafters take as input (mlx_gemma4.speculative)."""
        input_ids = self.check_ids(input_ids)
        if inputs_embeds is None and self._placeholder_ids is not None:
            # As transformers' Gemma4Model: placeholder ids without their features embed as padding.
            is_mm = mx.any(input_ids[..., None] == self._placeholder_ids, axis=-1)
            input_ids = mx.where(is_mm, self.text_config.pad_token_id, input_ids)
        with self.policy.applied() if self.policy is not None else contextlib.nullcontext():
            h = self.language_model(input_ids, cache, inputs_embeds=inputs_embeds, block_ids=block_ids,
                                    last_only=last_only)
            return (self.logits(h), h) if return_hidden else self.logits(h)

    def check_ids(self, input_ids) -> mx.array:
        """(B, L) int ids in range. Host inputs are always checked; lazy device arrays only for prompts
        (L > 1), so a decode step never forces a sync (its ids come from the sampler, always in range)."""
        if not isinstance(input_ids, mx.array):
            input_ids = mx.array(input_ids)
            check = True
        else:
            check = input_ids.shape[-1] > 1
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (mx.int32, mx.int64, mx.uint32, mx.int16, mx.uint16, mx.uint8, mx.int8):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        vocab = self.text_config.vocab_size
        if check and input_ids.size:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab}); got range [{lo}, {hi}]")
        return input_ids

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    @property
    def dtype(self) -> mx.Dtype:
        return self.language_model.norm.weight.dtype
