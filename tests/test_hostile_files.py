"""Hostile and malformed files: each is one documented error (mlx_gemma4.errors) with a message naming the
problem and the file; crafted sizes fail fast, before anything large is allocated (measured in a subprocess
under an address-space limit)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import numpy as np
import pytest

from hardening_fixtures import mm_processor, run_limited
from mlx_gemma4.errors import CheckpointError, MediaError
from mlx_gemma4.processing import Processor


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit RGB pixels, with a tiny (truncated) data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(10_000, 10_000), (60_000, 60_000)])
def test_decompression_bomb_png(tmp_path, size):
    """Over Pillow's pixel limit (and over twice it, where Pillow itself raises): refused before decoding."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(*size))
    processor = mm_processor()
    for source in (str(bomb), bomb.read_bytes()):
        with pytest.raises(MediaError, match=r"pixel|too many pixels"):
            processor.prompt_inputs([{"role": "user", "content": [{"type": "image", "image": source}]}])
    from mlx_gemma4.processing.image import load_image

    with pytest.raises(MediaError, match="bomb.png"):
        load_image(bomb)


def test_text_file_named_mp3(tmp_path):
    fake = tmp_path / "song.mp3"
    fake.write_text("these are the lyrics, not the song")
    from mlx_gemma4.processing.audio import load_audio

    with pytest.raises(MediaError, match="song.mp3.*not a recognized audio format") as e:
        load_audio(fake)
    assert "does not exist" not in str(e.value)
    with pytest.raises(MediaError, match="not a recognized audio format"):
        mm_processor().prompt_inputs([{"role": "user", "content": [{"type": "audio", "path": str(fake)}]}])


@pytest.mark.parametrize("content,match", [
    (b"{not json", "tokenizer_config.json is not valid JSON"),
    (b"\xff\xfe\x00garbage", "tokenizer_config.json is not a text"),
    (b"[1, 2, 3]", "tokenizer_config.json must hold a JSON object"),
    (b"[" * 50_000 + b"]" * 50_000, "tokenizer_config.json"),
])
def test_bad_tokenizer_config_names_the_file(tmp_path, content, match):
    from hardening_fixtures import mm_tokenizer_dir

    for f in mm_tokenizer_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        Processor.from_pretrained(tmp_path)


def test_bad_generation_and_processor_configs(tmp_path):
    from hardening_fixtures import mm_tokenizer_dir

    for f in mm_tokenizer_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "one"}))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{}")
    (tmp_path / "processor_config.json").write_text("nope")
    with pytest.raises(CheckpointError, match="processor_config.json is not valid JSON"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(CheckpointError, match="cannot read tokenizer .*tokenizer.json"):
        Processor.from_pretrained(tmp_path)


# ---- resource limits: the config against the checkpoint's tensors, before anything is built ------------------
CRAFTED_LIMIT = dict(memory_gb=1.0, timeout_s=5.0)


def assert_fails_fast(code: str, error: str, message: str):
    """Run `code` in a subprocess capped at its post-import address space + 1 GiB; it must raise `error` with
    `message` within 5 s, its peak RSS under 1 GB."""
    r = run_limited(code, **CRAFTED_LIMIT)
    stderr = r.stderr
    assert r.returncode != 0 and f"{error}: " in stderr, stderr[-3000:]
    assert message in stderr, stderr[-3000:]
    assert "MemoryError" not in stderr and "Segmentation" not in stderr, stderr[-3000:]
    elapsed = float(stderr.split("ELAPSED ")[1].split()[0])
    peak_mb = float(stderr.split("MAXRSS_MB ")[1].split()[0])
    assert elapsed < CRAFTED_LIMIT["timeout_s"], f"took {elapsed:.1f} s"
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"


def test_config_with_100000_layers_fails_fast(chat_checkpoint, tmp_path):
    """The issue's report: num_hidden_layers = 100000 without layer_types aborted after 27 s (cannot allocate)."""
    crafted = tmp_path / "crafted"
    shutil.copytree(chat_checkpoint("e2b"), crafted)
    config = json.loads((crafted / "config.json").read_text())
    config.pop("layer_types", None)
    config.update(num_hidden_layers=100000, num_kv_shared_layers=0)
    (crafted / "config.json").write_text(json.dumps(config))
    assert_fails_fast(f"from mlx_gemma4 import load\nload({str(crafted)!r})", "ConfigError",
                      "num_hidden_layers = 100000 is out of range")


def test_long_audio_is_refused_before_decoding(tmp_path):
    import soundfile

    clip = tmp_path / "long.wav"
    soundfile.write(clip, np.zeros(16000 * 35, np.float32), 16000)
    from mlx_gemma4.processing.audio import decode_audio

    with pytest.raises(MediaError, match="long.wav' is too long: 35.00 s"):
        decode_audio(clip)


def test_processor_config_ranges(tmp_path):
    from hardening_fixtures import mm_tokenizer_dir

    from mlx_gemma4.errors import ConfigError

    for f in mm_tokenizer_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    image = np.zeros((30, 30, 3), np.uint8)
    for block, key, value in [("image_processor", "patch_size", 0), ("image_processor", "pooling_kernel_size", -1),
                              ("video_processor", "num_frames", 10**9)]:
        (tmp_path / "processor_config.json").write_text(json.dumps({block: {key: value}}))
        kind = block.split("_")[0]
        with pytest.raises(ConfigError, match=f"{block}.{key} = {value}"):
            Processor.from_pretrained(tmp_path).prompt_inputs(
                [{"role": "user", "content": [{"type": kind, kind: image if kind == "image" else [image]}]}])
