"""Property-based fuzzing (tests/fuzz_inputs.py): random mutations of config.json, a checkpoint's config and
safetensors header, a GGUF header, a prompt-cache file, chat messages and sampling arguments either work or raise
one of the documented error types with a message of their own, within a per-example deadline, in a subprocess
whose address space is capped at what it uses after its imports plus 1 GiB.

CI runs a fixed example budget per target (25, derandomized); MLX_GEMMA4_FUZZ=long runs 2000 random examples per
target (MLX_GEMMA4_FUZZ_EXAMPLES overrides the CI budget)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints
from hardening_fixtures import mm_tokenizer_dir

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["config", "sampling", "messages", "checkpoint", "safetensors", "gguf", "prompt_cache"]
MEMORY_GB = 1.0


@pytest.fixture(scope="module")
def fuzz_files(chat_checkpoint, text_checkpoint, tmp_path_factory):
    """The valid inputs the mutations start from: a tiny chat checkpoint, its GGUF, a prompt cache made with it,
    and a tokenizer with Gemma 4's media tokens."""
    from mlx_gemma4.loading import load
    from mlx_gemma4.prompt_cache import PromptCache, save_prompt_cache

    checkpoint = chat_checkpoint("e2b")
    out = tmp_path_factory.mktemp("fuzz")
    gguf = checkpoints.make_gemma4_gguf(text_checkpoint("e2b", spelling="published"), out / "tiny.gguf")
    model, processor = load(checkpoint)
    cache = PromptCache.fresh(model)
    ids = processor.prompt_ids("the cat sat on the mat")
    import mlx.core as mx

    model(mx.array([ids]), cache=cache.caches)
    cache.tokens = list(ids)
    save_prompt_cache(out / "cache.safetensors", cache, model)
    return {"FUZZ_CHECKPOINT": str(checkpoint), "FUZZ_GGUF": str(gguf),
            "FUZZ_PROMPT_CACHE": str(out / "cache.safetensors"), "FUZZ_MM_TOKENIZER": str(mm_tokenizer_dir())}


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target, fuzz_files):
    env = dict(os.environ, **fuzz_files, MLX_GEMMA4_FUZZ_MEMORY_GB=str(MEMORY_GB),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]))
    long = os.environ.get("MLX_GEMMA4_FUZZ") == "long"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_inputs.py"), target], capture_output=True,
                       text=True, env=env, timeout=3600 if long else 300, cwd=ROOT)
    assert r.returncode == 0, f"fuzz target {target} failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n" \
                              f"{r.stderr[-8000:]}"
    assert f"{target}: ok" in r.stdout
