"""benchmarks/bench.py's bookkeeping: min/median aggregation, skipped contexts, errors, and argument errors.

(Speed itself is measured by running the benchmark, never asserted in tests.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _run(load_s, prefill_512, decode_s, skipped_2048=True):
    contexts = {"512": {"prefill_s": prefill_512, "ttft_s": prefill_512, "peak_mlx_bytes": 2**30,
                        "decode_s": decode_s, "decode_tokens": 4}}
    contexts["2048"] = {"skipped": "predicted 900 s > budget 100 s"} if skipped_2048 else dict(contexts["512"])
    return {"system": "x", "load_s": load_s, "contexts": contexts, "max_rss_bytes": 2 * 2**30,
            "decode": {"short_context": 512, "long_context": 512}}


def test_aggregate_min_and_median():
    agg = bench.aggregate([_run(3.0, 10.0, 2.0), _run(1.0, 4.0, 1.0), _run(2.0, 8.0, 4.0)])
    assert agg["runs"] == 3
    assert agg["load_s"] == {"min": 1.0, "median": 2.0}
    row = agg["contexts"]["512"]
    assert row["prefill_tok_s"] == {"max": 512 / 4.0, "median": 512 / 8.0}
    assert row["decode_tok_s"] == {"max": 4 / 1.0, "median": 4 / 2.0}
    assert agg["contexts"]["2048"]["skipped"].startswith("predicted")


def test_failed_runs_are_reported_not_hidden():
    agg = bench.aggregate([{"system": "mlx-lm", "error": "RuntimeError: boom", "returncode": 1}])
    table = bench.markdown({"mlx-lm": agg, "mlx-gemma4": bench.aggregate([_run(1.0, 4.0, 1.0)])}, [512, 2048])
    assert "error: RuntimeError: boom" in table
    assert "| prefill tok/s @ 512 | error: RuntimeError: boom | 128.0 / 128.0 |" in table
    assert "skipped: predicted 900 s > budget 100 s" in table


def test_argument_errors(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        bench.main(["--model", str(tmp_path)])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="unknown peer"):
        bench.main(["--model", str(tmp_path), "--peers", "llama.cpp"])
    with pytest.raises(SystemExit, match="--contexts"):
        bench.main(["--model", str(tmp_path), "--contexts", "512,lots"])
    with pytest.raises(SystemExit, match="nothing to run"):
        bench.main(["--model", str(tmp_path), "--peers", "none", "--skip-ours"])


def test_planner_estimate_is_shown_against_the_measured_peak():
    ours = _run(1.0, 4.0, 1.0)
    ours["contexts"]["512"]["planner_bytes"] = int(1.05 * 2**30)
    table = bench.markdown({"mlx-gemma4": bench.aggregate([ours]), "mlx-lm": bench.aggregate([_run(1.0, 4.0, 1.0)])},
                           [512])
    assert "| planner GiB @ 512 (/ MLX peak) | 1.05 (1.05x) | – |" in table
