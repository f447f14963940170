"""`python -m mlx_gemma4.generate` / `convert` / `prompt_cache` command lines: happy paths as subprocesses,
error paths in-process (same `main`, faster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma4 import cli as gen_cli

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, stdin: str | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_generate_cli_streams_and_prints_stats(chat_checkpoint):
    r = _run("mlx_gemma4.generate", "--model", str(chat_checkpoint("e2b")), "--prompt", "hello world",
             "--max-tokens", "7", "--temp", "0.7", "--top-k", "20", "--seed", "3", "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    stats = r.stderr.strip().splitlines()[-1]
    assert "generation: 7 tokens" in stats and "tok/s" in stats and "peak memory" in stats and "BLAS" in stats


def test_generate_cli_chat_repl_keeps_cache(chat_checkpoint):
    r = _run("mlx_gemma4.generate", "--model", str(chat_checkpoint("e2b")), "--chat", "--max-tokens", "4",
             stdin="hello\nand the world?\n/exit\n")
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stderr.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 2
    assert "cached" not in stats[0] and "cached)" in stats[1]  # the second turn reuses the first's KV cache


def test_generate_cli_missing_model_subprocess(tmp_path):
    r = _run("mlx_gemma4.generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 1
    assert "no checkpoint directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["--top-p", "2"], "--top-p: must be between 0 and 1"),
    (["--max-tokens", "0"], "--max-tokens: must be >= 1"),
    (["--temp", "-1"], "--temp: must be >= 0"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--no-chat-template", "--thinking"], "need the chat template"),
])
def test_generate_cli_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen_cli.main(["--model", "x", "--prompt", "hi", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_cli_needs_prompt(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gen_cli.main(["--model", "x"])
    assert exit_info.value.code == 2 and "--prompt is required" in capsys.readouterr().err


def _main_error(argv, capsys) -> str:
    assert gen_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_generate_cli_file_errors(chat_checkpoint, tmp_path, capsys):
    model = str(chat_checkpoint("e2b"))
    base = ["--model", model, "--prompt", "hi"]
    assert "--image: no such file" in _main_error([*base, "--image", str(tmp_path / "cat.png")], capsys)
    unreadable = tmp_path / "locked.wav"
    unreadable.write_bytes(b"RIFF")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root can read anything
        assert "--audio: cannot read" in _main_error([*base, "--audio", str(unreadable)], capsys)
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG")
    assert "cat.png" in _main_error([*base, "--image", str(image)], capsys)  # not a decodable image
    assert "prompt cache file not found" in _main_error([*base, "--prompt-cache", str(tmp_path / "c.safetensors")],
                                                       capsys)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "truncated" in _main_error(["--model", str(broken), "--prompt", "hi"], capsys)
    no_tokenizer = tmp_path / "weights-only"
    shutil.copytree(model, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in _main_error(["--model", str(no_tokenizer), "--prompt", "hi"], capsys)


def test_generate_cli_raw_prompt_and_stdin(chat_checkpoint, capsys, monkeypatch):
    import io

    from mlx_gemma4.processing import Processor

    path = chat_checkpoint("e2b")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello from stdin"))
    assert gen_cli.main(["--model", str(path), "--prompt", "-", "--no-chat-template", "--max-tokens", "3"]) == 0
    raw = Processor.from_pretrained(path).encode("hello from stdin")  # <bos> + the text, no template
    assert f"prompt: {len(raw)} tokens," in capsys.readouterr().err


def test_generate_cli_weights_dtype(chat_checkpoint, capsys):
    """--weights-dtype bfloat16 loads and generates; a bad value is a one-line error."""
    path = str(chat_checkpoint("e2b"))
    assert gen_cli.main(["--model", path, "--prompt", "hi", "--max-tokens", "3", "--weights-dtype", "bfloat16"]) == 0
    assert "generation: 3 tokens" in capsys.readouterr().err
    assert gen_cli.main(["--model", path, "--prompt", "hi", "--weights-dtype", "int8"]) == 1
    err = capsys.readouterr().err
    assert "unsupported weights dtype 'int8'" in err and "Traceback" not in err


# -- every failure is one line ----------------------------------------------------------------------------------
def _one_error_line(argv, capsys, main=gen_cli.main) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _copy(checkpoint, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(checkpoint, out)
    return out


def test_hostile_files_are_one_line_errors(chat_checkpoint, tmp_path, capsys):
    """Inputs from issue 13 that reach the command line: each is one `error:` line and exit code 1 (the library
    names the problem; anything it does not anticipate is still one line, with a hint to rerun with --verbose)."""
    import json
    import struct

    import mlx.core as mx
    from PIL import Image

    model = chat_checkpoint("e2b")
    listed = _copy(model, tmp_path, "header-list")
    header = json.dumps({"model.language_model.embed_tokens.weight": [1, 2, 3]}).encode()
    (listed / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    _one_error_line(["--model", str(listed), "--prompt", "hi"], capsys)

    not_json = _copy(model, tmp_path, "bad-tokenizer-config")
    (not_json / "tokenizer_config.json").write_text("{not json")
    _one_error_line(["--model", str(not_json), "--prompt", "hi"], capsys)

    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb)  # 225 M pixels in a few kB
    _one_error_line(["--model", str(model), "--prompt", "hi", "--image", str(bomb)], capsys)

    cache = tmp_path / "prefix.safetensors"
    assert gen_cli.prompt_cache_main(["--model", str(model), "--system", "Be brief.", "--out", str(cache)]) == 0
    arrays, meta = mx.load(str(cache), return_metadata=True)
    del meta["offsets"]
    mx.save_safetensors(str(cache), arrays, metadata=meta)
    capsys.readouterr()
    _one_error_line(["--model", str(model), "--prompt", "hi", "--system", "Be brief.", "--prompt-cache", str(cache)],
                    capsys)


def test_hostile_gguf_is_one_line_error(tmp_path, capsys):
    import gguf

    path = tmp_path / "zero-alignment.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gemma4")
    writer.add_uint32("general.alignment", 0)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_error_line(["--model", str(path), "--prompt", "hi"], capsys)


def test_unexpected_errors_hint_at_verbose_which_prints_the_traceback(capsys):
    def broken():
        raise ZeroDivisionError("integer division by zero")

    assert gen_cli.run_reporting_errors(broken) == 1
    assert capsys.readouterr().err == ("error: unexpected ZeroDivisionError: integer division by zero "
                                       "(rerun with --verbose for the traceback)\n")
    assert gen_cli.run_reporting_errors(broken, verbose=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: unexpected ZeroDivisionError: integer division by zero\n")

    def bad_input():
        raise ValueError("config field 'x' is 0\n  (must be >= 1)")

    assert gen_cli.run_reporting_errors(bad_input) == 1
    assert capsys.readouterr().err == "error: config field 'x' is 0; (must be >= 1)\n"

    def interrupted():
        raise KeyboardInterrupt

    assert gen_cli.run_reporting_errors(interrupted) == 130


@pytest.mark.parametrize("main,argv", [
    (gen_cli.prompt_cache_main, ["--model", "MISSING", "--out", "x.safetensors"]),
    (gen_cli.convert_main, ["--model", "MISSING", "--out", "OUT"]),
    (gen_cli.memory_main, ["--model", "MISSING", "--context", "10"]),
])
def test_every_command_reports_errors_as_one_line(main, argv, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("MISSING", "OUT") else a for a in argv]
    assert "MISSING" in _one_error_line(argv, capsys, main=main)
