"""Input processing for Gemma 4 12B (`gemma4_unified`), in numpy: no torch / torchvision.

Images (transformers' `Gemma4UnifiedImageProcessor`, torchvision backend, reproduced value for value):
  1. RGB conversion and the aspect-ratio-preserving size rule of the other Gemma 4 models (processing.image):
     the largest H x W, multiples of 48 px, with at most 9 * max_soft_tokens 16 px patches;
  2. torchvision's uint8 antialiased bicubic resize (processing.video.resize_bicubic_uint8);
  3. x * (1/255) in float32;
  4. 48 x 48 px "merged" patches (3 x 3 of the 16 px ones, transformers' `patches_merge`), each flattened as
     (row, column, channel), in row-major order, with position (column, row) on the 48 px grid;
  5. padded to max_soft_tokens patches (zero pixels, position (-1, -1)).
  One merged patch is one soft token: the prompt holds `<|image>` + N x `<|image|>` + `<image|>` as for the
  other models (N = (H/48)(W/48)).

Audio (`Gemma4UnifiedAudioFeatureExtractor` + `Gemma4UnifiedProcessor`): the 16 kHz waveform (decoded,
downmixed and resampled by processing.audio.prepare_waveform) cut into frames of 640 samples (40 ms), the last
one zero-padded; clips of a batch right-padded with zero frames (mask False). One frame is one soft token:
ceil(samples / 640) `<|audio|>` tokens per clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .audio import SAMPLING_RATE, AudioFeatures
from .image import (RESCALE_FACTOR, ImageLike, ImageProcessor, load_image, pad_patches, patch_positions, patchify,
                    target_size)
from .video import resize_bicubic_uint8

SAMPLES_PER_TOKEN = 640


@dataclass
class UnifiedImageProcessor(ImageProcessor):
    """`processor(images, max_soft_tokens=...)` -> ImageFeatures with (N, max_soft_tokens, 48*48*3) pixels."""

    @classmethod
    def from_dict(cls, d: dict) -> "UnifiedImageProcessor":
        kind = d.get("image_processor_type", "Gemma4UnifiedImageProcessor")
        if kind != "Gemma4UnifiedImageProcessor":
            raise ValueError(f"a gemma4_unified checkpoint needs Gemma4UnifiedImageProcessor, got {kind!r}")
        base = ImageProcessor.from_dict({k: v for k, v in d.items() if k != "image_processor_type"})
        return cls(base.max_soft_tokens, base.patch_size, base.pooling_kernel_size)

    def preprocess_one(self, image: ImageLike, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        rgb = load_image(image)
        height, width = target_size(rgb.shape[0], rgb.shape[1], max_soft_tokens, self.patch_size,
                                    self.pooling_kernel_size)
        if (height, width) != rgb.shape[:2]:
            rgb = resize_bicubic_uint8(rgb, height, width)
        pixels = rgb.astype(np.float32) * np.float32(RESCALE_FACTOR)
        side = self.patch_size * self.pooling_kernel_size
        patches = patchify(pixels, side)
        positions = patch_positions(height // side, width // side)
        tokens = patches.shape[0]
        patches, positions = pad_patches(patches, positions, max_soft_tokens)
        return patches, positions, tokens


@dataclass
class UnifiedAudioFeatureExtractor:
    """Raw waveform frames: `extractor(clips)` -> AudioFeatures with features (B, T, 640) float32."""

    samples_per_token: int = SAMPLES_PER_TOKEN
    padding_value: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnifiedAudioFeatureExtractor":
        d = dict(d)
        kind = d.pop("feature_extractor_type", "Gemma4UnifiedAudioFeatureExtractor")
        if kind != "Gemma4UnifiedAudioFeatureExtractor":
            raise ValueError(f"a gemma4_unified checkpoint needs Gemma4UnifiedAudioFeatureExtractor, got {kind!r}")
        rate = int(d.pop("sampling_rate", SAMPLING_RATE))
        if rate != SAMPLING_RATE:
            raise ValueError(f"feature_extractor.sampling_rate {rate} is not supported (Gemma 4 uses 16000)")
        size = {int(d.pop(k)) for k in ("audio_samples_per_token", "feature_size") if d.get(k) is not None}
        if len(size) > 1:
            raise ValueError(f"feature_extractor gives different frame sizes {sorted(size)}")
        padding_value = float(d.pop("padding_value", 0.0))
        if d.pop("padding_side", "right") != "right":
            raise ValueError("feature_extractor.padding_side must be 'right' for gemma4_unified")
        unknown = set(d) - {"processor_class", "return_attention_mask"}
        if unknown:
            raise ValueError(f"unsupported feature_extractor settings: {sorted(unknown)}")
        return cls(size.pop() if size else SAMPLES_PER_TOKEN, padding_value)

    def num_tokens(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.samples_per_token)

    def __call__(self, clips: Sequence[np.ndarray] | np.ndarray) -> AudioFeatures:
        if isinstance(clips, np.ndarray) and clips.ndim == 1:
            clips = [clips]
        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        if not clips:
            raise ValueError("no audio clips given")
        counts = [self.num_tokens(len(c)) for c in clips]
        T, n = max(counts), self.samples_per_token
        features = np.full((len(clips), T, n), self.padding_value, np.float32)
        mask = np.zeros((len(clips), T), bool)
        for i, (clip, count) in enumerate(zip(clips, counts)):
            frames = np.zeros(count * n, np.float32)  # the last frame's tail is zeros, not padding_value
            frames[: len(clip)] = clip
            features[i, :count] = frames.reshape(count, n)
            mask[i, :count] = True
        return AudioFeatures(features=features, mask=mask, num_soft_tokens=counts)
