"""Shared pytest fixtures. Test checkpoints come from tests/checkpoints.py (made once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import mlx_gemma4  # noqa: E402,F401  (loads the optimized BLAS before mlx.core)
import checkpoints  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / ".test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """Factory: text_checkpoint(variant, spelling=..., wrapper=...) -> Path, cached for the session."""
    made: dict[tuple, Path] = {}

    def make(variant: str, spelling: str = "per_layer_config", wrapper: str = "causal_lm") -> Path:
        key = (variant, spelling, wrapper)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{variant}-{spelling}-{wrapper}")
            made[key] = checkpoints.make_text_checkpoint(out, variant, spelling=spelling, wrapper=wrapper)
        return made[key]

    return make


@pytest.fixture(scope="session")
def multimodal_checkpoint(tmp_path_factory):
    """Factory: multimodal_checkpoint(text_variant, vision_variant=None) -> Path of a saved tiny
    Gemma4ForConditionalGeneration (text + vision tower; vision variant defaults to the published pairing)."""
    made: dict[tuple, Path] = {}

    def make(text_variant: str, vision_variant: str | None = None, audio: bool = False) -> Path:
        key = (text_variant, vision_variant, audio)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{text_variant}-vision-{vision_variant or 'default'}-audio{int(audio)}")
            made[key] = checkpoints.make_multimodal_checkpoint(out, text_variant, vision_variant, audio=audio)
        return made[key]

    return make
