"""Shared pytest fixtures. Test checkpoints come from tests/checkpoints/ (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlx_gemma4  # noqa: F401  (loads the optimized BLAS before mlx.core)
import checkpoints  # tests/checkpoints/ (tests/ is on pytest's pythonpath)

ARTIFACTS = Path(__file__).resolve().parent.parent / ".test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def metal_emulator():
    """`with metal_emulator(**msim_options) as runner:` runs the kernels' Metal bodies under the msim emulator
    (race-checked by default; see tests/kernel_emulator.py)."""
    from kernel_emulator import emulated_metal

    return emulated_metal


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
def text_model(text_checkpoint):
    """Factory: text_model(variant) -> our float32 model of text_checkpoint(variant), loaded once per session
    (models hold no state between calls: caches are the caller's)."""
    from mlx_gemma4 import load

    made: dict[str, object] = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = load(text_checkpoint(variant), dtype="float32")[0]
        return made[variant]

    return get


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


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Factory: tokenizer_dir(vocab_size=512) -> directory with tokenizer.json, tokenizer_config.json and the
    built-in Gemma 4 chat_template.jinja (checkpoints.make_tokenizer), cached for the session."""
    made: dict[int, Path] = {}

    def make(vocab_size: int = checkpoints.VOCAB) -> Path:
        if vocab_size not in made:
            out = tmp_path_factory.mktemp(f"tokenizer-{vocab_size}")
            made[vocab_size] = checkpoints.make_tokenizer(out, vocab_size)
        return made[vocab_size]

    return make


@pytest.fixture(scope="session")
def chat_checkpoint(text_checkpoint, tokenizer_dir, tmp_path_factory):
    """Factory: chat_checkpoint(variant) -> a copy of text_checkpoint(variant) with the 512-id tokenizer and
    chat template added (what `python -m mlx_gemma4.generate` needs), cached for the session."""
    import shutil

    made: dict[str, Path] = {}

    def make(variant: str = "e2b") -> Path:
        if variant not in made:
            out = tmp_path_factory.mktemp(f"chat-{variant}")
            shutil.copytree(text_checkpoint(variant), out, dirs_exist_ok=True)
            shutil.copytree(tokenizer_dir(checkpoints.VOCAB), out, dirs_exist_ok=True)
            made[variant] = out
        return made[variant]

    return make


@pytest.fixture(scope="session")
def audio_chat_checkpoint(tmp_path_factory):
    """The tiny E2B-with-audio-tower checkpoint (checkpoints.make_audio_checkpoint) plus a 512-id tokenizer whose
    image/audio control tokens sit at the checkpoint's ids (MM_TOKEN_IDS)."""
    out = checkpoints.make_audio_checkpoint(tmp_path_factory.mktemp("chat-e2b-audio"))
    return checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)


@pytest.fixture(scope="session")
def vision_chat_checkpoint(multimodal_checkpoint, tmp_path_factory):
    """multimodal_checkpoint("e2b") (text + vision tower) plus the 512-id tokenizer with MM_TOKEN_IDS."""
    import shutil

    out = tmp_path_factory.mktemp("chat-e2b-vision")
    shutil.copytree(multimodal_checkpoint("e2b"), out, dirs_exist_ok=True)
    return checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)


@pytest.fixture(scope="session")
def unified_chat_checkpoint(tmp_path_factory):
    """A tiny Gemma 4 12B-like checkpoint (checkpoints.family.make_unified_checkpoint: text + encoder-free image
    and audio front ends) plus the 512-id tokenizer with MM_TOKEN_IDS."""
    from checkpoints import family

    out = family.make_unified_checkpoint(tmp_path_factory.mktemp("chat-12b-unified"))
    return checkpoints.make_tokenizer(out, checkpoints.VOCAB, multimodal_ids=checkpoints.MM_TOKEN_IDS)
