"""Image preprocessing parity with transformers' Pillow-backend Gemma4ImageProcessorPil.

Pictures are made here: a photograph-like gradient + noise, a Pillow drawing with shapes and text, and
their grayscale / RGBA / palette / LA / CMYK / 1-bit versions, at odd sizes and aspect ratios (including
1xN strips and images smaller than one 48 px cell, which are upscaled). Every budget is checked: token
counts, pixel values and position ids must be identical (exact equality, same dtypes).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlx_gemma4.processing import image as improc
from mlx_gemma4.processing.image import SUPPORTED_SOFT_TOKEN_BUDGETS, ImageProcessor

BUDGETS = SUPPORTED_SOFT_TOKEN_BUDGETS


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients + a soft blob + sensor-like noise, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    blob = np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.05)
    rgb = np.stack([200 * x + 40 * blob, 180 * y + 60 * blob, 120 * (1 - x * y) + 30 * np.sin(12 * x)], -1)
    rgb += rng.normal(0, 12, rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def drawing(height: int, width: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (250, 245, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.1, width * 0.7, height * 0.8), fill=(200, 30, 40), outline=(0, 0, 0))
    draw.rectangle((width * 0.5, height * 0.3, width * 0.95, height * 0.9), fill=(20, 90, 200))
    draw.line((0, 0, width, height), fill=(10, 160, 20), width=5)
    draw.text((width * 0.05, height * 0.85), "Gemma 4", fill=(0, 0, 0))
    return image


def rgba_with_alpha(height: int, width: int) -> Image.Image:
    rgb = photo_like(height, width, seed=1)
    alpha = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    alpha[: height // 3] = 0  # fully transparent band
    return Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)]), "RGBA")


def cases() -> dict[str, Image.Image]:
    photo = Image.fromarray(photo_like(333, 517))
    draw = drawing(251, 613)
    palette_transparent = drawing(97, 143).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette_transparent.info["transparency"] = 3
    return {
        "photo_333x517": photo,
        "drawing_251x613": draw,
        "portrait_701x129": Image.fromarray(photo_like(701, 129, seed=2)),
        "gray_L_333x517": photo.convert("L"),
        "bilevel_1": draw.convert("1"),
        "rgba_211x389": rgba_with_alpha(211, 389),
        "la_211x389": rgba_with_alpha(211, 389).convert("LA"),
        "palette_P": draw.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "palette_P_transparency": palette_transparent,
        "cmyk": photo.convert("CMYK"),
        "tiny_upscaled_29x37": Image.fromarray(photo_like(29, 37, seed=3)),
        "one_pixel_1x1": Image.fromarray(photo_like(1, 1, seed=4)),
        "strip_1x700": Image.fromarray(photo_like(1, 700, seed=5)),
        "strip_900x2": Image.fromarray(photo_like(900, 2, seed=6)),
        "exact_grid_144x192": Image.fromarray(photo_like(144, 192, seed=7)),
    }


SIZE_CASES = ("photo_333x517", "portrait_701x129", "rgba_211x389", "tiny_upscaled_29x37", "strip_1x700",
              "strip_900x2", "exact_grid_144x192")


@pytest.fixture(scope="module")
def reference():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


def assert_same(ours, theirs):
    assert ours.num_soft_tokens == list(theirs["num_soft_tokens_per_image"])
    assert ours.pixel_values.dtype == theirs["pixel_values"].dtype == np.float32
    assert ours.position_ids.dtype == theirs["image_position_ids"].dtype
    assert ours.pixel_values.shape == theirs["pixel_values"].shape
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
    np.testing.assert_array_equal(ours.position_ids, theirs["image_position_ids"])


@pytest.mark.parametrize("budget", BUDGETS)
def test_pil_images_equal_transformers(reference, budget):
    processor = ImageProcessor()
    images = cases()
    if budget not in (70, 280):  # colour modes don't depend on the budget: sizes/aspect ratios suffice here
        images = {k: v for k, v in images.items() if k in SIZE_CASES}
    for name, image in images.items():
        ours = processor(image, max_soft_tokens=budget)
        theirs = reference(image, max_soft_tokens=budget)
        assert_same(ours, theirs)
        assert 0 < ours.num_soft_tokens[0] <= budget, name
        # the placeholder count is what the resize rule predicts from the size alone
        assert improc.num_soft_tokens(image.height, image.width, budget) == ours.num_soft_tokens[0]


def test_batch_of_mixed_images_equals_transformers(reference):
    images = list(cases().values())[:6]
    ours = ImageProcessor(max_soft_tokens=140)(images)
    theirs = reference(images, max_soft_tokens=140)
    assert_same(ours, theirs)
    assert ours.pixel_values.shape == (6, 140 * 9, 768)


def test_numpy_arrays_equal_transformers(reference):
    rgb = photo_like(157, 263, seed=8)
    rgba = np.dstack([rgb, np.linspace(0, 255, 263).astype(np.uint8)[None].repeat(157, 0)])
    gray = rgb[..., :1]
    for array in (rgb, rgba, gray, np.ascontiguousarray(rgb.transpose(2, 0, 1))):
        for budget in (70, 280):
            assert_same(ImageProcessor()(array, max_soft_tokens=budget), reference(array, max_soft_tokens=budget))
    # a 2-D grayscale array (transformers wants a channel axis) equals the (H, W, 1) one
    assert_same(ImageProcessor()(gray[..., 0], max_soft_tokens=70), reference(gray, max_soft_tokens=70))


def test_alpha_is_composited_onto_white():
    transparent = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    features = ImageProcessor()(transparent, max_soft_tokens=70)
    n_real = int((features.position_ids[0, :, 0] >= 0).sum())
    np.testing.assert_array_equal(features.pixel_values[0, :n_real], 1.0)  # white, not black
    np.testing.assert_array_equal(features.pixel_values[0, n_real:], 0.0)  # padding


def test_files_equal_transformers_on_the_opened_image(reference, tmp_path):
    from PIL import ImageOps

    photo = Image.fromarray(photo_like(303, 411, seed=9))
    paths = {"png": tmp_path / "a.png", "jpg": tmp_path / "a.jpg", "rgba.png": tmp_path / "b.png"}
    photo.save(paths["png"])
    photo.save(paths["jpg"], quality=85)
    rgba_with_alpha(123, 321).save(paths["rgba.png"])
    # a JPEG with EXIF orientation 6 (rotate 90): must come out upright (411 high, 303 wide)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_path = tmp_path / "rotated.jpg"
    photo.save(rotated_path, exif=exif)
    paths["rotated.jpg"] = rotated_path
    for path in paths.values():
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
        for budget in (70, 560):
            assert_same(ImageProcessor()(str(path), max_soft_tokens=budget), reference(upright, max_soft_tokens=budget))
    rgb = improc.load_image(rotated_path)
    assert rgb.shape == (411, 303, 3)


def test_prompt_placeholder():
    assert improc.image_placeholder(3) == "<|image>" + "<|image|>" * 3 + "<image|>"
    features = ImageProcessor()([Image.fromarray(photo_like(100, 100))], max_soft_tokens=70)
    assert features.placeholders() == [improc.image_placeholder(features.num_soft_tokens[0])]


def test_target_size_rule():
    # 2:1 image at the 280 budget: 48*k multiples, at most 2520 patches
    h, w = improc.target_size(1000, 2000, 280)
    assert h % 48 == 0 and w % 48 == 0 and (h // 16) * (w // 16) <= 2520
    assert (h, w) == (528, 1104)
    # the same rule the transformers processor uses for prompt lengths
    from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

    for size in [(1, 1), (1, 5000), (7000, 3), (480, 640), (1080, 1920), (4000, 3000), (37, 29)]:
        for budget in BUDGETS:
            assert improc.target_size(*size, budget) == get_aspect_ratio_preserving_size(
                *size, patch_size=16, max_patches=budget * 9, pooling_kernel_size=3)


def test_from_dict_reads_processor_config():
    import json
    from pathlib import Path

    ref = Path("/work/shared/reference/gemma4/processor.json")
    if not ref.exists():
        pytest.skip("reference processor.json not present on this machine")
    block = json.loads(ref.read_text())["processor_config.json"]["image_processor"]
    assert ImageProcessor.from_dict(block) == ImageProcessor(max_soft_tokens=280)
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor.from_dict(dict(block, resample=2))


# ---------------------------------------------------------------------------------------------- bad input


def test_unsupported_budget():
    for bad in (0, 100, 281, 2240, True):
        with pytest.raises(ValueError, match="Unsupported image soft-token budget"):
            ImageProcessor()(np.zeros((64, 64, 3), np.uint8), max_soft_tokens=bad)
    with pytest.raises(ValueError, match="Unsupported image soft-token budget"):
        ImageProcessor(max_soft_tokens=300)


def test_zero_size_images():
    for size in [(0, 0), (0, 5), (5, 0)]:
        with pytest.raises(ValueError, match="zero size"):
            ImageProcessor()(Image.new("RGB", size))
        with pytest.raises(ValueError, match="zero size"):
            ImageProcessor()(np.zeros((size[1], size[0], 3), np.uint8))


def test_corrupt_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="not a recognized image format"):
        ImageProcessor()(garbage)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(photo_like(200, 200)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ImageProcessor()(truncated)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageProcessor()(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="not a file"):
        ImageProcessor()(tmp_path)


def test_bad_arrays():
    with pytest.raises(ValueError, match="integers 0..255"):
        ImageProcessor()(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="0..255"):
        ImageProcessor()(np.full((32, 32, 3), 300, np.int32))
    with pytest.raises(ValueError, match="channels"):
        ImageProcessor()(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        ImageProcessor()(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="an image path"):
        ImageProcessor()(12345)
    with pytest.raises(ValueError, match="No images"):
        ImageProcessor()([])
