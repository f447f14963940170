"""Gemma 4 image preprocessing in numpy + Pillow (no torch / torchvision).

Equal, value for value, to transformers' Pillow-backend processor (`Gemma4ImageProcessorPil`):

  1. RGB conversion. PIL images with an alpha band (RGBA, LA, PA, P with a `transparency` entry) are
     composited onto white with `Image.alpha_composite`; every other mode (L, 1, P, CMYK, I, ...) goes
     through `Image.convert("RGB")`. Numpy arrays: 1 channel is repeated, 4 channels are blended onto white
     in float64 and rounded. Image *files* are opened with Pillow and turned upright by their EXIF
     orientation, then converted as PIL images above. (transformers' own path loader, `load_image`, calls
     `convert("RGB")` directly, which drops alpha instead of compositing onto white; we composite.)
  2. Aspect-ratio-preserving bicubic resize to the largest H x W, both multiples of
     `pooling_kernel_size * patch_size` (48 px), with at most `9 * max_soft_tokens` 16 px patches.
  3. Rescale by 1/255 (computed in float64, stored as float32; no mean/std normalization: the vision tower
     maps x -> 2x - 1 itself).
  4. Patchify into rows of 16*16*3 values, ordered (patch row, patch column, channel).
  5. Pad to `9 * max_soft_tokens` patches with zero pixels and position (-1, -1).

The number of soft tokens of an image is (H/16)(W/16)/9; the prompt holds
`<|image>` + N x `<|image|>` + `<image|>` for it (`image_placeholder`).

Budgets (`max_soft_tokens`): 70, 140, 280 (default), 560, 1120, selectable per call.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import check_int
from ..errors import MediaError
from .media import file_or_bytes

SUPPORTED_SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
PATCH_SIZE = 16
POOLING_KERNEL_SIZE = 3
RESCALE_FACTOR = 1 / 255

BOI_TOKEN = "<|image>"
IMAGE_TOKEN = "<|image|>"
EOI_TOKEN = "<image|>"

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
# Largest image decoded (Pillow's own decompression-bomb threshold; a 12000 x 7400 photo is 89 M pixels).
MAX_IMAGE_PIXELS = 89_478_485


# --------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# --------------------------------------------------------------------------------------------------


def open_image(source: str | os.PathLike | bytes | bytearray) -> Image.Image:
    """Open an image file (or the encoded bytes of one) with Pillow, fully decoded and turned upright by its
    EXIF orientation. Images of more than MAX_IMAGE_PIXELS pixels are refused before they are decoded."""
    what, handle = file_or_bytes(source, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise MediaError(f"Cannot read {what}: {width}x{height} pixels is more than the "
                                     f"{MAX_IMAGE_PIXELS}-pixel limit (a decompression bomb?)")
                image.load()  # decode now, so truncated/corrupt data fails here, not later
                return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
        raise MediaError(f"Cannot read {what}: too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"Cannot read {what}: not a recognized image format ({e})") from e
    except MediaError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"Cannot read {what}: the file is corrupt or truncated ({e})") from e


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) uint8 array with C in {1, 3, 4} -> (H, W, 3) uint8.

    3-D arrays are read as channels-last when the last axis has 1, 3 or 4 entries, else channels-first."""
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise MediaError(
            f"Image arrays must hold integers 0..255 (e.g. uint8), got dtype {array.dtype}; "
            "convert float images with (x * 255).round().astype(np.uint8)"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise MediaError(f"Image array values must lie in 0..255, got [{array.min()}, {array.max()}]")
    array = array.astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
    else:
        raise MediaError(f"Image arrays must be 2-D (H, W) or 3-D (H, W, C), got shape {array.shape}")
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 3:
        return array
    if channels == 4:
        # Blend onto white in float64 and round half to even, as transformers' numpy convert_to_rgb does.
        alpha = array[..., 3:4] / 255
        blended = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(blended).astype(np.uint8)
    raise MediaError(f"Image arrays must have 1, 3 or 4 channels, got shape {array.shape}")


def load_image(image: ImageLike) -> np.ndarray:
    """A path, encoded bytes, PIL image or uint8 array -> (H, W, 3) uint8 RGB array (alpha composited onto
    white)."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
    else:
        raise TypeError(f"Expected an image path, image bytes, a PIL.Image.Image or a numpy array, got "
                        f"{type(image).__name__}")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise MediaError(
            f"Image has zero size ({height}x{width} pixels); transformers cannot process it either "
            "(ZeroDivisionError in its resize rule)"
        )
    return rgb


# --------------------------------------------------------------------------------------------------
# Resize rule and token counts
# --------------------------------------------------------------------------------------------------


def check_budget(max_soft_tokens: int) -> int:
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_SOFT_TOKEN_BUDGETS:
        raise ValueError(
            f"Unsupported image soft-token budget {max_soft_tokens!r}; "
            f"choose one of {SUPPORTED_SOFT_TOKEN_BUDGETS}"
        )
    return int(max_soft_tokens)


def target_size(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
                patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> tuple[int, int]:
    """Resized (height, width): the largest multiples of pooling*patch px with the image's aspect ratio
    and at most pooling^2 * max_soft_tokens patches (`get_aspect_ratio_preserving_size` in transformers)."""
    check_budget(max_soft_tokens)
    if height <= 0 or width <= 0:
        raise ValueError(f"Image has zero size ({height}x{width} pixels)")
    max_patches = max_soft_tokens * pooling_kernel_size**2
    side = pooling_kernel_size * patch_size
    scale = math.sqrt(max_patches * patch_size**2 / (height * width))
    new_height = int(math.floor(scale * height / side)) * side
    new_width = int(math.floor(scale * width / side)) * side
    # A very thin image: the short side rounds down to 0. It becomes one pooling cell (48 px) thick and the
    # long side takes floor(aspect ratio) cells, at most max_soft_tokens of them.
    longest = max_soft_tokens * side
    if new_height == 0 and new_width == 0:  # cannot happen for the supported budgets; kept as a guard
        raise ValueError(f"Image of {height}x{width} pixels would be resized to 0x0")
    if new_height == 0:
        new_height, new_width = side, min((width // height) * side, longest)
    elif new_width == 0:
        new_height, new_width = min((height // width) * side, longest), side
    return new_height, new_width


def num_soft_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
                    patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> int:
    """Number of image soft tokens for an image of height x width pixels at this budget."""
    new_height, new_width = target_size(height, width, max_soft_tokens, patch_size, pooling_kernel_size)
    return (new_height // patch_size) * (new_width // patch_size) // pooling_kernel_size**2


def image_placeholder(num_tokens: int) -> str:
    """Prompt text standing for one image: `<|image>` + num_tokens x `<|image|>` + `<image|>`."""
    return BOI_TOKEN + IMAGE_TOKEN * num_tokens + EOI_TOKEN


# --------------------------------------------------------------------------------------------------
# Pixel pipeline
# --------------------------------------------------------------------------------------------------


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with Pillow's antialiased bicubic filter."""
    if rgb.shape[:2] == (height, width):
        return rgb
    resized = Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def rescale(rgb: np.ndarray, factor: float = RESCALE_FACTOR) -> np.ndarray:
    """uint8 -> float32 in [0, 1]; the product is taken in float64 and then rounded to float32."""
    return (rgb.astype(np.float64) * factor).astype(np.float32)


def patchify(image: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p*p*C); patches in row-major order, each flattened as (row, col, channel)."""
    height, width, channels = image.shape
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


def patch_positions(rows: int, cols: int) -> np.ndarray:
    """(rows*cols, 2) int64 (x, y) = (column, row) of each patch, in row-major order."""
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def pad_patches(patches: np.ndarray, positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to `length` rows: zero pixels, position (-1, -1)."""
    missing = length - patches.shape[0]
    if missing < 0:
        raise ValueError(f"{patches.shape[0]} patches exceed the padded length {length}")
    patches = np.pad(patches, ((0, missing), (0, 0)))
    positions = np.pad(positions, ((0, missing), (0, 0)), constant_values=-1)
    return patches, positions


@dataclass
class ImageFeatures:
    """Preprocessed images, ready for the vision tower.

    pixel_values:    (num_images, max_patches, 3 * patch_size**2) float32 in [0, 1]
    position_ids:    (num_images, max_patches, 2) int64 patch (x, y); (-1, -1) marks padding
    num_soft_tokens: soft tokens each image yields (its placeholder length in the prompt)
    max_soft_tokens: the budget used
    """

    pixel_values: np.ndarray
    position_ids: np.ndarray
    num_soft_tokens: list[int] = field(default_factory=list)
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS

    def placeholders(self) -> list[str]:
        return [image_placeholder(n) for n in self.num_soft_tokens]


@dataclass
class ImageProcessor:
    """Gemma 4 image processor. `processor(images, max_soft_tokens=...)` -> ImageFeatures."""

    max_soft_tokens: int = DEFAULT_SOFT_TOKENS
    patch_size: int = PATCH_SIZE
    pooling_kernel_size: int = POOLING_KERNEL_SIZE

    def __post_init__(self):
        check_budget(self.max_soft_tokens)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """From the `image_processor` block of a checkpoint's processor_config.json."""
        expected = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "resample": 3}
        for key, value in expected.items():
            if key in d and d[key] != value:
                raise ValueError(f"Unsupported image processor setting {key}={d[key]!r} "
                                 f"(only {value!r} is implemented)")
        if "rescale_factor" in d and not math.isclose(d["rescale_factor"], RESCALE_FACTOR, rel_tol=1e-9):
            raise ValueError(f"Unsupported rescale_factor {d['rescale_factor']!r} (only 1/255 is implemented)")
        if d.get("do_normalize"):
            if list(d.get("image_mean", [0.0] * 3)) != [0.0] * 3 or list(d.get("image_std", [1.0] * 3)) != [1.0] * 3:
                raise ValueError("Unsupported image normalization: only mean 0 / std 1 is implemented")
        name = "processor_config.json image_processor."
        return cls(
            max_soft_tokens=d.get("max_soft_tokens", DEFAULT_SOFT_TOKENS),
            patch_size=check_int(name + "patch_size", d.get("patch_size", PATCH_SIZE), 1, 1024),
            pooling_kernel_size=check_int(name + "pooling_kernel_size", d.get("pooling_kernel_size",
                                                                              POOLING_KERNEL_SIZE), 1, 64),
        )

    def preprocess_one(self, image: ImageLike, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One image -> (padded patches, padded positions, number of soft tokens)."""
        rgb = load_image(image)
        height, width = target_size(rgb.shape[0], rgb.shape[1], max_soft_tokens, self.patch_size,
                                    self.pooling_kernel_size)
        pixels = rescale(resize_bicubic(rgb, height, width))
        patches = patchify(pixels, self.patch_size)
        positions = patch_positions(height // self.patch_size, width // self.patch_size)
        tokens = patches.shape[0] // self.pooling_kernel_size**2
        patches, positions = pad_patches(patches, positions, max_soft_tokens * self.pooling_kernel_size**2)
        return patches, positions, tokens

    def __call__(self, images: ImageLike | Sequence[ImageLike], max_soft_tokens: int | None = None) -> ImageFeatures:
        budget = check_budget(self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens)
        if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"Expected an image path, a PIL.Image.Image, a numpy array or a list of them, "
                            f"got {type(images).__name__}")
        images = list(images)
        if not images:
            raise ValueError("No images given")
        results = [self.preprocess_one(image, budget) for image in images]
        return ImageFeatures(
            pixel_values=np.stack([r[0] for r in results]),
            position_ids=np.stack([r[1] for r in results]),
            num_soft_tokens=[r[2] for r in results],
            max_soft_tokens=budget,
        )
