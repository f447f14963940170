"""Loading: Hub/local resolution, sharded safetensors, name mapping, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_gemma4 import load
from mlx_gemma4.config import ConfigError
from mlx_gemma4.loading import CheckpointError


@pytest.fixture
def ckpt(text_checkpoint, tmp_path):
    """A private copy of the E2B-like checkpoint that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(text_checkpoint("e2b"), dst)
    return dst


def tensors(path):
    return load_file(str(path / "model.safetensors"))


def shard(path, n_shards=3):
    """Rewrite a checkpoint as n shards + index, the way large checkpoints ship."""
    w = tensors(path)
    (path / "model.safetensors").unlink()
    names = sorted(w)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: w[k] for k in names[i::n_shards]}
        save_file(part, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def logits(model):
    return np.array(model(mx.array([[5, 6, 7, 8, 9, 10]])))


def test_sharded_checkpoint_loads_like_single_file(ckpt, text_checkpoint):
    ref = logits(load(text_checkpoint("e2b"))[0])
    shard(ckpt)
    np.testing.assert_allclose(logits(load(ckpt)[0]), ref, rtol=0, atol=0)


def test_missing_shard_is_named(ckpt):
    shard(ckpt)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weight shards.*model-00002-of-00003"):
        load(ckpt)


def test_truncated_safetensors_is_named(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load(ckpt)


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(ckpt)


def test_config_of_another_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'llama' is not a Gemma 4 checkpoint"):
        load(ckpt)


def test_missing_unexpected_and_misshaped_tensors_listed_together(ckpt):
    w = tensors(ckpt)
    del w["model.layers.0.mlp.gate_proj.weight"]
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"][:, :10].copy()
    w["model.layers.0.surprise.weight"] = np.zeros((2, 2), np.float32)
    save_file(w, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load(ckpt)
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "language_model.layers.0.mlp.gate_proj.weight" in msg
    assert "unexpected tensors (1)" in msg and "language_model.layers.0.surprise.weight" in msg
    assert "wrong shapes (1)" in msg and "layers.1.mlp.up_proj.weight: checkpoint (96, 10)" in msg


def test_unused_kv_weights_of_shared_layers_are_accepted_and_dropped(ckpt, text_checkpoint):
    """The real E2B/E4B files still hold k/v weights for KV-shared layers."""
    ref = logits(load(text_checkpoint("e2b"))[0])
    w = tensors(ckpt)
    first_shared = 6  # 10 layers, 4 shared
    for i in range(first_shared, 10):
        src = i - 5  # a producer layer of the same type has the right shapes
        for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            w[f"model.layers.{i}.self_attn.{name}"] = w[f"model.layers.{src}.self_attn.{name}"]
    save_file(w, str(ckpt / "model.safetensors"))
    np.testing.assert_array_equal(logits(load(ckpt)[0]), ref)


def test_missing_directory_and_offline_hub(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load("google/gemma-4-E2B-it")


def test_hub_cache_is_used_when_offline(monkeypatch, tmp_path, text_checkpoint):
    """A repo id resolves through huggingface_hub's cache layout (what snapshot_download returns)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snap = cache / "models--google--gemma-4-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(text_checkpoint("e2b"), snap)
    (cache / "models--google--gemma-4-tiny" / "refs").mkdir()
    (cache / "models--google--gemma-4-tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    model, _ = load("google/gemma-4-tiny")
    np.testing.assert_array_equal(logits(model), logits(load(text_checkpoint("e2b"))[0]))


def test_out_of_range_token_ids_are_a_clear_error(text_checkpoint):
    model, _ = load(text_checkpoint("e2b"))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(mx.array([[1, 2, 100000]]))


def test_prompt_longer_than_the_context_is_a_clear_error(text_checkpoint):
    model, _ = load(text_checkpoint("31b"))
    limit = model.config.text.max_position_embeddings
    cache = model.make_cache()
    model(mx.zeros((1, limit - 2), mx.int32), cache=cache, last_only=True)
    with pytest.raises(ValueError, match="context too long"):
        model(mx.zeros((1, 3), mx.int32), cache=cache)


def test_loading_does_not_hold_the_checkpoint_twice(tmp_path):
    """bf16 weights cast to float32 at load: the process's peak RSS grows by about the float32 model, not by the
    float32 model plus the stored bf16 tensors (each stored tensor is freed once its cast copy exists)."""
    import subprocess
    import sys

    from mlx_gemma4 import memory, synth

    config = synth.shrink_config(memory.load_preset("e2b"), layers=2, vocab=65536)
    synth.write_checkpoint(config, tmp_path, fmt="hf")
    stored = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    probe = (
        "import resource, sys\n"
        "import mlx_gemma4, mlx.core as mx\n"
        "from mlx_gemma4.loading import load\n"
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "before = rss()\n"
        "model, _ = load(sys.argv[1], dtype='float32')\n"
        "print(rss() - before, mx.get_active_memory())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    grown, resident = map(int, out.stdout.split())
    assert resident > 1.9 * stored  # the float32 model really is resident
    assert grown < resident + 0.4 * stored, f"peak RSS grew {grown / 2**20:.0f} MiB for a {resident / 2**20:.0f} MiB model"
