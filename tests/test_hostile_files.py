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

from hardening_fixtures import mm_processor, run_limited, write_gemma3_gguf
from mlx_gemma4.errors import CheckpointError, ConfigError, MediaError
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


def test_gguf_with_a_billion_blocks_fails_fast(tmp_path):
    """The issue's report: a ~131 KB gemma3 GGUF with block_count = 10**9 grew to 7.5 GB before being killed."""
    crafted = write_gemma3_gguf(tmp_path / "crafted.gguf", block_count=10**9, layers=1)
    assert crafted.stat().st_size < 200_000
    assert_fails_fast(f"from mlx_gemma4 import load\nload({str(crafted)!r})", "ConfigError", "block_count")


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


def safetensors_with_header(source, out, edit) -> None:
    """Copy the checkpoint `source` to `out` with its model.safetensors header replaced by edit(header)."""
    shutil.copytree(source, out)
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    blob = json.dumps(header).encode()
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def first_tensor(header) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit,message", [
    (lambda h: list(h.values()), "the safetensors header must be a JSON object, not a list"),
    (lambda h: {**h, first_tensor(h): [1, 2]}, "its header entry must be an object, not list"),
    (lambda h: {**h, first_tensor(h): "x"}, "its header entry must be an object, not str"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": {"a": 1}}}, "the shape must be a list"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": [-1, 4]}}, "the shape must be a list"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "shape": [2**62, 2**62]}}, "bytes, but its"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "dtype": "F128"}}, "unknown dtype 'F128'"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "data_offsets": [8, 4]}}, "0 <= begin <= end"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "data_offsets": None}}, "data_offsets must be"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "data_offsets": [0, 10**15]}}, "is truncated"),
    (lambda h: {k: {kk: vv for kk, vv in v.items() if kk != "data_offsets"} if k != "__metadata__" else v
                for k, v in h.items()}, "data_offsets must be"),
])
def test_malformed_safetensors_headers(chat_checkpoint, tmp_path, edit, message):
    from mlx_gemma4.loading import load

    safetensors_with_header(chat_checkpoint("e2b"), tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load(tmp_path / "bad")
    assert "model.safetensors" in str(e.value)


@pytest.mark.parametrize("key,value,error,message", [
    ("num_hidden_layers", 1000, CheckpointError, "has 1000 layers, but the tensors hold layers 0..9"),
    ("vocab_size", 1024, CheckpointError, "vocab_size is 1024, but .*embed_tokens.weight has 512 rows"),
    ("hidden_size", 128, CheckpointError, "hidden_size is 128, but .*embed_tokens.weight has 64 columns"),
    ("num_attention_heads", 8, CheckpointError, "num_attention_heads x head_dim of layer 0 is 128"),
    ("intermediate_size", 1 << 20, CheckpointError, "implies at least .* parameters"),
])
def test_config_is_checked_against_the_tensors_before_building(chat_checkpoint, tmp_path, key, value, error,
                                                               message):
    from mlx_gemma4.loading import load

    crafted = tmp_path / "crafted"
    shutil.copytree(chat_checkpoint("e2b"), crafted)
    config = json.loads((crafted / "config.json").read_text())
    config[key] = value
    if key == "num_hidden_layers":
        config.pop("layer_types", None)
    (crafted / "config.json").write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mlx_gemma4.loading.build_model", lambda *a: pytest.fail("a module tree was built"))
        with pytest.raises(error, match=message):
            load(crafted)


def gguf_bytes(metadata: bytes, n_kv: int = 1, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + metadata


def gguf_key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_gguf_header_attacks(tmp_path):
    from mlx_gemma4.loading import load

    # an array nested 100000 deep
    nested = gguf_key("general.deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 100_000 \
        + struct.pack("<IQ", 4, 0)
    (tmp_path / "deep.gguf").write_bytes(gguf_bytes(nested))
    with pytest.raises(CheckpointError, match="deep.gguf: metadata 'general.deep' is an array nested too deeply"):
        load(tmp_path / "deep.gguf")
    # alignment 0 (was a ZeroDivisionError), 3 (not a power of two)
    for value in (0, 3, 2**40):
        write_gemma3_gguf(tmp_path / "align.gguf", metadata={"general.alignment": value})
        with pytest.raises(CheckpointError, match=f"general.alignment = {value} must be a power of two"):
            load(tmp_path / "align.gguf")
    # a block count the tensors do not have
    write_gemma3_gguf(tmp_path / "blocks.gguf", block_count=5, layers=2)
    with pytest.raises(CheckpointError, match="block_count = 5, but the file holds tensors for blocks 0..1"):
        load(tmp_path / "blocks.gguf")
    # metadata of the wrong kind
    write_gemma3_gguf(tmp_path / "kind.gguf", metadata={"gemma3.attention.head_count": "many"})
    with pytest.raises(ConfigError, match="kind.gguf: the GGUF metadata does not describe a usable model"):
        load(tmp_path / "kind.gguf")
    write_gemma3_gguf(tmp_path / "pattern.gguf", metadata={"gemma3.attention.sliding_window_pattern": 0})
    with pytest.raises(ConfigError, match="sliding_window_pattern = 0 must be a positive integer"):
        load(tmp_path / "pattern.gguf")


@pytest.mark.parametrize("merges,message", [
    (["t1 t2", "no-space"], "malformed tokenizer.ggml.merges entry 'no-space'"),
    (["zz qq"], "the GGUF tokenizer cannot be built: .*out of vocabulary"),
])
def test_gguf_bad_merges(tmp_path, merges, message):
    from mlx_gemma4.loading import load

    path = write_gemma3_gguf(tmp_path / "merges.gguf",
                             metadata={"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.merges": merges})
    with pytest.raises(CheckpointError, match=message) as e:
        load(path)
    assert "merges.gguf" in str(e.value)
