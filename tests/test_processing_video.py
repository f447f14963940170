"""Video preprocessing vs transformers' Gemma4VideoProcessor.

transformers' video processor class needs torchvision, which cannot be installed beside this CPU torch, so
the reference is transformers' own code with only torchvision's two functions swapped for what they run:
  - frame decoding + sampling: transformers.video_utils.read_video_pyav + default_sample_indices_fn (real);
  - Gemma4VideoProcessor._preprocess and aspect_ratio_preserving_resize, TorchvisionBackend's fused
    rescale_and_normalize (real code, module loaded from its file), with tvF.resize ->
    torch.nn.functional.interpolate(uint8, "bicubic", antialias=True) (what torchvision's resize_image calls
    for uint8 CPU tensors) and tvF.normalize -> (x - mean) / std in float32;
  - prompt: Gemma4Processor.replace_video_token (real, called with a stand-in for the tokenizer attributes).
Everything must be exactly equal.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mlx_gemma4.processing import video as vidproc
from mlx_gemma4.processing.video import VideoProcessor

av = pytest.importorskip("av", reason="PyAV (optional extra `video`) is not installed")


def moving_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for t in range(n):
        rgb = np.stack([255 * ((x + t / n) % 1), 255 * y, 128 + 100 * np.sin(9 * x + t / 3)], -1)
        frames.append(np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_mp4(path, frames: np.ndarray, fps: int = 24) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _reference_module():
    """transformers' video_processing_gemma4, loaded with two torchvision functions replaced by the torch
    calls torchvision makes for them on CPU: resize (uint8 bicubic antialias -> interpolate on uint8, see
    torchvision.transforms.v2.functional.resize_image) and normalize ((x - mean) / std in float32)."""
    import importlib.util
    import sys

    import torch
    import transformers.models.gemma4 as gemma4

    name = "transformers.models.gemma4._video_reference_for_tests"
    if name in sys.modules:
        return sys.modules[name]

    def resize(video, size, interpolation, antialias):
        return torch.nn.functional.interpolate(video, size=size, mode="bicubic", align_corners=False,
                                               antialias=antialias)

    spec = importlib.util.spec_from_file_location(name, f"{gemma4.__path__[0]}/video_processing_gemma4.py")
    module = importlib.util.module_from_spec(spec)
    module.tvF = SimpleNamespace(InterpolationMode=object, resize=resize)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_features(frames: np.ndarray, budget: int):
    """Gemma4VideoProcessor._preprocess (real code) on (T, H, W, 3) uint8 frames."""
    import torch
    from transformers.image_processing_backends import TorchvisionBackend

    ref = _reference_module()

    class Processor:
        aspect_ratio_preserving_resize = ref.Gemma4VideoProcessor.aspect_ratio_preserving_resize
        rescale_and_normalize = TorchvisionBackend.rescale_and_normalize
        _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor

        def normalize(self, image, mean, std, inplace=False):  # torchvision's normalize_image
            mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
            return image.sub(mean).div_(std)

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    out = ref.Gemma4VideoProcessor._preprocess(
        Processor(), [video], do_resize=True, resample=None, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), return_tensors=None,
        patch_size=16, max_soft_tokens=budget, pooling_kernel_size=3)
    return (out["pixel_values_videos"].numpy(), out["video_position_ids"].numpy(),
            out["num_soft_tokens_per_video"][0])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_mp4(path, moving_frames(40, 90, 160))
    return path


def test_resize_equals_torch_uint8_antialiased_bicubic():
    import torch

    rng = np.random.default_rng(0)
    for (H, W, h, w) in [(90, 160, 144, 240), (360, 640, 96, 192), (97, 131, 48, 336), (1, 7, 48, 336),
                         (240, 100, 240, 48), (53, 61, 480, 432)]:
        frames = rng.integers(0, 256, (1, H, W, 3), dtype=np.uint8)
        theirs = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
                                                 size=(h, w), mode="bicubic", antialias=True)
        ours = vidproc.resize_bicubic_uint8(frames, h, w)
        np.testing.assert_array_equal(ours, theirs.permute(0, 2, 3, 1).numpy())


def test_frame_sampling_equals_transformers():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (32, 40, 97, 1000):
        meta = VideoMetadata(total_num_frames=total, fps=30.0)
        np.testing.assert_array_equal(vidproc.sample_frame_indices(total, 32),
                                      default_sample_indices_fn(meta, num_frames=32))
        np.testing.assert_array_equal(vidproc.sample_frame_indices(total, None, fps=2, video_fps=30.0),
                                      default_sample_indices_fn(meta, fps=2))
    # deviation: a short clip keeps all its frames (transformers raises)
    np.testing.assert_array_equal(vidproc.sample_frame_indices(10, 32), np.arange(10))


def test_decoding_equals_transformers_pyav_reader(clip):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    for kwargs in ({"num_frames": 32}, {"num_frames": 8}, {"fps": 6}):
        theirs, meta = read_video_pyav(str(clip), partial(default_sample_indices_fn, **kwargs))
        ours = vidproc.read_video(clip, **({"num_frames": None} if "fps" in kwargs else {}), **kwargs)
        np.testing.assert_array_equal(ours.frames, theirs)
        assert ours.indices == list(meta.frames_indices) and ours.fps == meta.fps
        assert ours.timestamps == meta.timestamps


@pytest.mark.parametrize("budget", [70, 140])
def test_file_pipeline_equals_reference(clip, budget):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    # 5 frames keep the CPU time down (the 32-frame default sampling is checked in the decoding test)
    frames, _ = read_video_pyav(str(clip), partial(default_sample_indices_fn, num_frames=5))
    pixels, positions, tokens = reference_features(frames, budget)
    ours = VideoProcessor()(clip, max_soft_tokens=budget, num_frames=5)
    assert ours.tokens_per_frame == tokens and ours.num_frames == 5
    assert ours.num_soft_tokens == 5 * tokens
    assert ours.pixel_values.dtype == pixels.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, pixels)
    np.testing.assert_array_equal(ours.position_ids, positions)


def test_frame_list_pipeline_and_placeholder_equal_reference():
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata

    frames = moving_frames(5, 211, 97, seed=3)
    ours = VideoProcessor()([Image.fromarray(f) for f in frames], fps=2.0)
    pixels, positions, tokens = reference_features(frames, 70)
    np.testing.assert_array_equal(ours.pixel_values, pixels)
    np.testing.assert_array_equal(ours.position_ids, positions)
    tokenizer_like = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    meta = VideoMetadata(total_num_frames=5, fps=2.0, frames_indices=list(range(5)))
    expected = Gemma4Processor.replace_video_token(
        tokenizer_like, {"num_soft_tokens_per_video": [tokens], "video_metadata": [meta]}, 0)
    assert ours.placeholder() == expected
    assert ours.placeholder().startswith("00:00 <|image><|video|>") and "00:02 <|image>" in ours.placeholder()


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_videos(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 definitely not a video" * 10)
    with pytest.raises(ValueError, match="corrupt or not a video"):
        VideoProcessor()(garbage)
    with pytest.raises(FileNotFoundError, match="not found"):
        VideoProcessor()(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="same size"):
        VideoProcessor()([np.zeros((50, 60, 3), np.uint8), np.zeros((60, 50, 3), np.uint8)])
    with pytest.raises(ValueError, match="No frames"):
        VideoProcessor()([])
    with pytest.raises(ValueError, match="Unsupported image soft-token budget"):
        VideoProcessor()(moving_frames(2, 50, 50), max_soft_tokens=99)
    with pytest.raises(ValueError, match="mutually exclusive"):
        vidproc.sample_frame_indices(100, 8, fps=2, video_fps=24)
    with pytest.raises(TypeError, match="video path"):
        VideoProcessor()(42)
