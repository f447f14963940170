"""Model level: the tiny 26B-like (MoE, bidirectional image blocks, global head dim) and E2B-like (8:1 GQA,
KV sharing) checkpoints give the same logits with the Metal decode kernels (run by the emulator, race-checked) as
with the MLX path, for a prompt (MLX path), a 3-token chunk and token-by-token decode (decode kernels), reading
the caches' K/V in place."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import checkpoints
from mlx_gemma4 import load
from mlx_gemma4.kernels import decode_attention as da
from mlx_gemma4.kernels import expert_decode as ed
from mlx_gemma4.kernels import use_backend

RTOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run(model, ids, chunks, block_ids=None):
    """Logits of `ids` fed in chunks of the given sizes through one cache."""
    cache = model.make_cache()
    out, pos = [], 0
    for size in chunks:
        blk = None if block_ids is None else mx.array(block_ids[pos:pos + size])
        out.append(np.array(model(mx.array(ids[:, pos:pos + size]), cache=cache, block_ids=blk)))
        pos += size
    assert pos == ids.shape[1]
    return np.concatenate(out, axis=1)


# (variant, quantize, image token span): 26B's window is 16, so a 20-token image makes queries at its start
# see keys past their window-limited past (window AND (causal OR same image)); a 9-token one fits inside it.
CASES = [("26b", None, (4, 24)), ("e2b", None, None), ("26b", 4, (6, 15))]


@pytest.mark.parametrize("variant,quantize,image", CASES)
def test_emulated_kernels_match_mlx_path(text_checkpoint, variant, quantize, image, metal_emulator):
    kw = dict(quantize=quantize, group_size=32) if quantize else {}
    model, _ = load(text_checkpoint(variant), dtype="float32", **kw)
    ids = np.random.RandomState(3).randint(3, checkpoints.VOCAB, (1, 34))
    block_ids = None
    if image is not None:
        block_ids = -np.ones(ids.shape[1], np.int32)
        block_ids[image[0]:image[1]] = 0
    # a 26-token prompt (MLX path: > 8 queries / tokens), then a 3-token chunk and single-token decode steps
    chunks = [26, 3] + [1] * 5
    with use_backend("mlx"):
        want = run(model, ids, chunks, block_ids)
    with metal_emulator() as runner:
        got = run(model, ids, chunks, block_ids)
    used = runner.compiled
    assert da.PASS1_SINGLE.name in used
    assert (ed.SPEC.name in used) == (variant == "26b")
    assert rel_err(got, want) < RTOL
