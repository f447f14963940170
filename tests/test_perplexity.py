"""mlx_gemma4.perplexity and the quantization tools' command lines on tiny checkpoints: the NLL/KL/top-1 numbers
are what their definitions give, whatever the chunking; `convert --recipe dynamic` reports per-matrix bits and
writes a checkpoint mlx-lm loads with our logits; `mlx-gemma4-perplexity` prints the comparison."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import cli, load
from mlx_gemma4.perplexity import evaluate, kl_divergence, log_probs

IDS = [2] + [int(t) for t in np.random.RandomState(3).randint(3, 500, 40)]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def models(chat_checkpoint):
    path = chat_checkpoint("e2b")
    return (path, load(path, dtype="float32")[0],
            load(path, dtype="float32", quantize=4, recipe="minmax")[0])


def test_evaluate_is_the_definition_whatever_the_chunking(models):
    _, model, quantized = models
    ref = _log_softmax(model(mx.array([IDS]))[0])
    other = _log_softmax(quantized(mx.array([IDS]))[0])
    targets = np.array(IDS[1:])
    nll = -ref[np.arange(len(targets)), targets].mean()
    q_nll = -other[np.arange(len(targets)), targets].mean()
    kl = (np.exp(ref) * (ref - other)).sum(-1)[:-1].mean()
    top1 = (ref.argmax(-1) == other.argmax(-1))[:-1].mean()
    for chunk in (7, 256):  # chunks through the caches = one pass
        r = evaluate(quantized, [IDS], model, chunk=chunk)
        assert r.tokens == len(IDS) - 1
        assert r.nll == pytest.approx(q_nll, rel=1e-4) and r.reference_nll == pytest.approx(nll, rel=1e-4)
        assert r.mean_kl == pytest.approx(kl, rel=1e-3) and r.top1_agreement == pytest.approx(top1)
        assert r.perplexity == pytest.approx(math.exp(q_nll), rel=1e-4)
    pooled = evaluate(quantized, [IDS[:20], IDS[20:]])  # each sequence predicts its own tokens 1..n-1
    assert pooled.tokens == len(IDS) - 2
    assert evaluate(model, [IDS], model).mean_kl == pytest.approx(0, abs=1e-6)
    assert kl_divergence(log_probs(model, IDS), log_probs(quantized, IDS)) == pytest.approx(
        (np.exp(ref) * (ref - other)).sum(-1).mean(), rel=1e-3)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, [[2]])


def test_perplexity_command(models, tmp_path, capsys):
    path = models[0]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    assert cli.perplexity_main(["--model", str(path), "--text", str(text), "--reference", str(path), "--quantize",
                                "4", "--recipe", "mixed", "--dtype", "float32", "--max-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "over 47 tokens" in out and "mean KL vs reference" in out and "top-1 agreement" in out
    assert cli.perplexity_main(["--model", str(path), "--text", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err


def test_dynamic_conversion_reports_bits_and_loads_in_mlx_lm(chat_checkpoint, tmp_path, capsys):
    """convert --recipe dynamic (26B-like MoE): the report lists bits per weight and each layer's matrices, some
    raised above 4 bits; mlx-lm loads the mixed-precision checkpoint and computes our logits."""
    from checkpoints.interop import PeerModel

    src = chat_checkpoint("26b")
    out = tmp_path / "dyn"
    assert cli.convert_main(["--model", str(src), "--out", str(out), "--bits", "4", "--recipe", "dynamic",
                             "--target-bpw", "6", "--format", "mlx-lm", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "bits per weight" in err and "bits per layer" in err and "layer   0:" in err
    config = json.loads((out / "config.json").read_text())
    raised = {k: v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict) and v["bits"] > 4}
    assert any(".layers." in k for k in raised), raised
    ours = load(out)[0]
    ids = mx.array([IDS])
    a, b = ours(ids), PeerModel("mlx-lm", out).logits(ids)
    assert float(mx.abs(a - b).max()) < 2e-3 * float(mx.abs(b).max())
