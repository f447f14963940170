"""Gemma 4 video preprocessing in numpy (frames from a file via PyAV, or from a list of images).

Reimplements transformers' `Gemma4VideoProcessor` (video_processing_gemma4.py, torchvision backend) without
torch/torchvision:

  1. Frames: `num_frames` (32) indices `arange(n) * total // n` of a video's frames (or, with `fps`,
     `max(1, int(total / video_fps * fps))` of them), decoded with PyAV to RGB, as transformers'
     `read_video_pyav` + `default_sample_indices_fn` do. One deviation: a clip with fewer frames than asked
     (transformers raises) uses all of its frames. A list of images is one frame per image (sampled the same
     way when it holds more than `num_frames`); their timestamps assume `fps` (default 24, as transformers).
  2. Every frame gets the image rule's aspect-ratio-preserving size for the video budget (70 soft tokens a
     frame by default) and is resized with torchvision's uint8 antialiased bicubic filter, reproduced exactly
     (`resize_bicubic_uint8`: Pillow's filter taps, but int16 weights with torch's precision rule).
  3. x / 255 in float32 (torchvision's fused rescale + normalize with mean 0, std 1), then patchify / pad /
     positions exactly as for images (mlx_gemma4.processing.image).

The prompt for a video is, per frame, `mm:ss <|image>` + N x `<|video|>` + `<image|>`, joined by spaces
(Gemma4Processor.replace_video_token); the frames' soft tokens replace the `<|video|>` tokens in order.
PyAV is optional: `pip install mlx-gemma4[video]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import check_int
from ..errors import MediaError
from .media import file_or_bytes
from .image import (BOI_TOKEN, EOI_TOKEN, MAX_IMAGE_PIXELS, PATCH_SIZE, POOLING_KERNEL_SIZE, ImageLike, check_budget,
                    load_image, pad_patches, patch_positions, patchify, target_size)

VIDEO_TOKEN = "<|video|>"
DEFAULT_NUM_FRAMES = 32
DEFAULT_VIDEO_SOFT_TOKENS = 70
DEFAULT_FPS_FOR_FRAME_LISTS = 24.0


# --------------------------------------------------------------------------------------------------
# Frame sampling and decoding
# --------------------------------------------------------------------------------------------------


def sample_frame_indices(total_frames: int, num_frames: int | None = DEFAULT_NUM_FRAMES, fps: float | None = None,
                         video_fps: float | None = None) -> np.ndarray:
    """Indices of the frames to keep: `num_frames` spread uniformly, or `fps` frames per second of video.

    transformers' default_sample_indices_fn, except that asking for more frames than the clip has yields all
    of them instead of an error."""
    if total_frames <= 0:
        raise ValueError("The video has no frames")
    if fps is not None:
        if num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive; pass only one")
        if not video_fps:
            raise ValueError("Sampling by `fps` needs the video's own frame rate, which is unknown")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_frames)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    num_frames = min(num_frames, total_frames)
    return np.arange(num_frames) * total_frames // num_frames


@dataclass
class Frames:
    """Decoded frames (T, H, W, 3) uint8, the clip's frame rate and the indices they were taken from."""

    frames: np.ndarray
    fps: float | None
    indices: list[int]
    total_frames: int

    @property
    def timestamps(self) -> list[float]:
        fps = self.fps or DEFAULT_FPS_FOR_FRAME_LISTS
        return [i / fps for i in self.indices]


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("Reading video files needs PyAV: pip install av  (or: pip install mlx-gemma4[video])") from e
    return av


def read_video(source: str | os.PathLike | bytes, num_frames: int | None = DEFAULT_NUM_FRAMES,
               fps: float | None = None) -> Frames:
    """Decode the sampled frames of a video file (or its bytes) to RGB with PyAV (transformers'
    read_video_pyav)."""
    av = _import_av()
    what, handle = file_or_bytes(source, "video")
    handle = str(handle) if isinstance(handle, Path) else handle
    try:
        with av.open(handle) as container:
            if not container.streams.video:
                raise MediaError(f"{what} has no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"Cannot read {what}: frames of {stream.width}x{stream.height} pixels are more "
                                 f"than the {MAX_IMAGE_PIXELS}-pixel limit")
            video_fps = float(stream.average_rate) if stream.average_rate else None
            total = int(stream.frames)
            if total <= 0:  # the container does not record a frame count: count by decoding
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            indices = sample_frame_indices(total, num_frames, fps, video_fps)
            wanted, last = set(indices.tolist()), int(indices[-1])
            frames = []
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as e:
        raise MediaError(f"Cannot read {what}: the file is corrupt or not a video ({e})") from e
    if len(frames) != len(indices):
        raise MediaError(f"Cannot read {what}: its header says {total} frames but only "
                         f"{len(frames)} of the sampled ones could be decoded")
    return Frames(np.stack(frames), video_fps, indices.tolist(), total)


def frames_from_images(images: Sequence[ImageLike], num_frames: int | None = None,
                       fps: float | None = None) -> Frames:
    """A list of images as the frames of one video (all must have the same size)."""
    if not images:
        raise ValueError("No frames given")
    rgb = [load_image(image) for image in images]
    sizes = {f.shape for f in rgb}
    if len(sizes) > 1:
        raise ValueError(f"All frames of a video must have the same size, got {sorted(s[:2] for s in sizes)}")
    indices = sample_frame_indices(len(rgb), num_frames) if num_frames else np.arange(len(rgb))
    return Frames(np.stack([rgb[i] for i in indices]), fps, indices.tolist(), len(rgb))


# --------------------------------------------------------------------------------------------------
# torchvision's uint8 antialiased bicubic resize
# --------------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _filter_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, K) source indices and normalized float64 weights of the antialiased bicubic filter
    (support 2 * max(scale, 1) around each output pixel's center, as Pillow / torch compute them)."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    width = int((stop - first).max())
    offsets = np.arange(width)
    weights = _cubic((first[:, None] + offsets - centers[:, None] + 0.5) / stretch)
    weights = np.where(offsets < (stop - first)[:, None], weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.minimum(first[:, None] + offsets, in_size - 1), weights


def _int16_weights(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """Fixed-point weights: the most fraction bits (< 22) that keep 2x the largest weight below 2^15, values
    rounded half away from zero (torch's _compute_index_ranges_int16_weights)."""
    bits = 0
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = weights * (1 << bits)
    return np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int64), bits


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    index, weights = _filter_taps(in_size, out_size)
    fixed, bits = _int16_weights(weights)
    # int32 is exact: |sum| <= 255 * sum(|fixed|) < 255 * 2^16
    src = np.ascontiguousarray(np.moveaxis(image, axis, 0)).astype(np.int32)
    fixed = fixed.astype(np.int32).reshape(out_size, index.shape[1], *(1,) * (src.ndim - 1))
    acc = np.full((out_size, *src.shape[1:]), 1 << (bits - 1), np.int32)  # + 0.5 for rounding
    for k in range(index.shape[1]):
        acc += src[index[:, k]] * fixed[:, k]
    return np.moveaxis(np.clip(acc >> bits, 0, 255).astype(np.uint8), 0, axis)


def resize_bicubic_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W, C) uint8 -> (..., height, width, C): torch.nn.functional.interpolate(mode="bicubic",
    antialias=True) on uint8 CPU tensors (what torchvision's resize runs), horizontal pass first."""
    w_axis, h_axis = frames.ndim - 2, frames.ndim - 3
    return _resize_axis(_resize_axis(frames, width, w_axis), height, h_axis)


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------


def format_timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_placeholder(timestamps: Sequence[float], tokens_per_frame: int, token: str = VIDEO_TOKEN,
                      begin: str = BOI_TOKEN, end: str = EOI_TOKEN) -> str:
    """Prompt text standing for one video: per frame `mm:ss <|image>` + N x `<|video|>` + `<image|>`."""
    frame = begin + token * tokens_per_frame + end
    return " ".join(f"{format_timestamp(t)} {frame}" for t in timestamps)


@dataclass
class VideoFeatures:
    """One preprocessed video.

    pixel_values:   (frames, max_patches, 3 * patch_size**2) float32 in [0, 1]
    position_ids:   (frames, max_patches, 2) int64, (-1, -1) = padding
    tokens_per_frame: soft tokens each frame yields
    timestamps:     seconds of each kept frame (index / fps)
    """

    pixel_values: np.ndarray
    position_ids: np.ndarray
    tokens_per_frame: int
    timestamps: list[float] = field(default_factory=list)
    frame_indices: list[int] = field(default_factory=list)
    fps: float | None = None

    @property
    def num_frames(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def num_soft_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    def placeholder(self) -> str:
        return video_placeholder(self.timestamps, self.tokens_per_frame)


@dataclass
class VideoProcessor:
    """Gemma 4 video processor: `processor(path_or_frames, ...)` -> VideoFeatures."""

    max_soft_tokens: int = DEFAULT_VIDEO_SOFT_TOKENS
    num_frames: int = DEFAULT_NUM_FRAMES
    patch_size: int = PATCH_SIZE
    pooling_kernel_size: int = POOLING_KERNEL_SIZE

    def __post_init__(self):
        check_budget(self.max_soft_tokens)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoProcessor":
        """From the `video_processor` block of processor_config.json."""
        if d.get("resample", 3) != 3:
            raise ValueError(f"Unsupported video resample {d['resample']!r} (only 3 = bicubic is implemented)")
        if list(d.get("image_mean", [0.0] * 3)) != [0.0] * 3 or list(d.get("image_std", [1.0] * 3)) != [1.0] * 3:
            raise ValueError("Unsupported video normalization: only mean 0 / std 1 is implemented")
        name = "processor_config.json video_processor."
        return cls(max_soft_tokens=d.get("max_soft_tokens", DEFAULT_VIDEO_SOFT_TOKENS),
                   num_frames=check_int(name + "num_frames", d.get("num_frames", DEFAULT_NUM_FRAMES), 1, 1024),
                   patch_size=check_int(name + "patch_size", d.get("patch_size", PATCH_SIZE), 1, 1024),
                   pooling_kernel_size=check_int(name + "pooling_kernel_size",
                                                 d.get("pooling_kernel_size", POOLING_KERNEL_SIZE), 1, 64))

    def load(self, video, num_frames: int | None = None, fps: float | None = None) -> Frames:
        if isinstance(video, Frames):
            return video
        if isinstance(video, (str, os.PathLike, bytes, bytearray)):
            if fps is not None:  # sample `fps` frames per second instead of a fixed count
                return read_video(video, num_frames=num_frames, fps=fps)
            return read_video(video, num_frames=num_frames or self.num_frames)
        if isinstance(video, np.ndarray) and video.ndim == 4:
            video = list(video)
        if isinstance(video, (list, tuple)):
            return frames_from_images(video, num_frames=num_frames or self.num_frames, fps=fps)
        raise TypeError(f"Expected a video path, a list of frames or a (T, H, W, C) array, got {type(video).__name__}")

    def __call__(self, video, max_soft_tokens: int | None = None, num_frames: int | None = None,
                 fps: float | None = None) -> VideoFeatures:
        """video: a file path (frames sampled: `num_frames`, default 32, or `fps` per second), a list of
        images / (T, H, W, C) uint8 array (one frame each; `fps` = their frame rate for timestamps)."""
        budget = check_budget(self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens)
        clip = self.load(video, num_frames, fps)
        frames = clip.frames
        height, width = target_size(frames.shape[1], frames.shape[2], budget, self.patch_size,
                                    self.pooling_kernel_size)
        if (height, width) != frames.shape[1:3]:
            frames = resize_bicubic_uint8(frames, height, width)
        pixels = frames.astype(np.float32) / np.float32(255)
        max_patches = budget * self.pooling_kernel_size**2
        positions = patch_positions(height // self.patch_size, width // self.patch_size)
        padded = [pad_patches(patchify(f, self.patch_size), positions, max_patches) for f in pixels]
        return VideoFeatures(
            pixel_values=np.stack([p for p, _ in padded]),
            position_ids=np.stack([q for _, q in padded]),
            tokens_per_frame=positions.shape[0] // self.pooling_kernel_size**2,
            timestamps=clip.timestamps,
            frame_indices=clip.indices,
            fps=clip.fps,
        )
