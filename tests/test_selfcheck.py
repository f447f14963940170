"""`python -m mlx_gemma4.selfcheck`: every kernel class a model uses is compiled and agrees with the MLX path (in
CI through the msim emulator, correctness only), reported as a table and JSON."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_gemma4 import selfcheck


@pytest.fixture
def verdict_dir(tmp_path, monkeypatch):
    from mlx_gemma4.kernels import verdicts

    monkeypatch.setattr(verdicts, "default_cache_dir", lambda: tmp_path / "cache")
    return tmp_path


def test_selfcheck_of_a_model_in_the_emulator(text_checkpoint, verdict_dir, capsys):
    out = verdict_dir / "selfcheck.json"
    rc = selfcheck.main(["--model", str(text_checkpoint("26b")), "--kernel-factory", "msim:metal_kernel",
                         "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0
    assert {"device", "os", "mlx", "package", "timed", "classes"} <= set(report)
    assert report["mlx"] == mx.__version__ and report["timed"] is False  # an emulator: correctness only
    kinds = {c["class"].split("/")[0] for c in report["classes"]}
    assert kinds == {"decode_attention", "expert_decode"}
    assert len({c["class"] for c in report["classes"] if c["class"].startswith("decode_attention/")}) == 2
    for c in report["classes"]:  # every kernel class the model's decode step uses
        assert c["compiled"] and c["agrees"] is True and c["max_rel_error"] < 1e-4, c
        assert c["chosen"] == "mlx" and c["kernel_ms"] is None
    table = capsys.readouterr().out
    assert "| kernel class | compiled |" in table and "expert_decode/dtype=float32" in table
    assert not (verdict_dir / "cache").exists()  # untimed verdicts are not cached for the dispatcher


def test_without_metal_or_factory_it_says_so(verdict_dir, capsys):
    if mx.metal.is_available():
        pytest.skip("this machine has Metal: the checks run for real")
    report = selfcheck.run()
    assert report["classes"] == [] and "no Metal device" in report["note"]


def test_published_classes_cover_every_model_shape_and_agree(verdict_dir):
    """Without --model: each published model's decode attention (bfloat16; head dims 256 and 512 with their GQA
    ratios) and the 26B's experts at 4 and 8 bits and in bfloat16, every one compiled and agreeing in the
    emulator (the real banks are never built: agreement runs on small banks stored the same way)."""
    out = verdict_dir / "published.json"
    assert selfcheck.main(["--kernel-factory", "msim:metal_kernel", "--json", str(out)]) == 0
    classes = json.loads(out.read_text())["classes"]
    assert all(c["compiled"] and c["agrees"] is True for c in classes), classes
    keys = {c["class"] for c in classes}
    attention = {k.split("/src=")[0] for k in keys if k.startswith("decode_attention/")}
    assert attention == {f"decode_attention/dtype=bfloat16/head_dim={d}/groups={g}"
                         for d, g in ((256, 8), (512, 8), (256, 4), (512, 4), (256, 2))}
    experts = {k.split("/src=")[0] for k in keys if k.startswith("expert_decode/")}
    assert experts == {"expert_decode/dtype=bfloat16/bits=4/group_size=64/scales=bfloat16",
                       "expert_decode/dtype=bfloat16/bits=8/group_size=64/scales=bfloat16",
                       "expert_decode/dtype=bfloat16/weights=bfloat16"}
