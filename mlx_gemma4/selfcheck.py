"""Check the Metal kernels on this machine: for each kernel class, did it compile, does it agree with the MLX path,
is it faster, and which path will run.

    python -m mlx_gemma4.selfcheck [--model PATH] [--json out.json] [--kernel-factory MODULE:NAME]

On a Mac, run this once and attach the JSON to bug reports. Without --model it checks the kernel classes of the
published Gemma 4 models (E2B, E4B, 26B A4B, 31B; bfloat16, the 26B's experts at 4 and 8 bits and in bfloat16)
on synthetic inputs of their shapes; with --model, the classes that model's decode step uses, timed on its own
expert banks. The verdicts go to the same cache the dispatcher reads (see `mlx_gemma4.kernels.verdicts`).
Without a Metal device nothing can run the kernels unless --kernel-factory names a replacement for
`mx.fast.metal_kernel` (the test suite passes msim's emulator, `msim:metal_kernel`): then every class is
compiled and checked for agreement, but not timed (correctness only).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx

from . import kernels
from .config import ModelConfig
from .kernels import decode_attention, expert_decode, verdicts
from .kernels.gather_experts import ExpertBank

PUBLISHED = ("e2b", "e4b", "26b-a4b", "31b")
EXPERT_STORAGE = ((4, 64), (8, 64), (None, None))  # (bits, group size); None: bfloat16 weights


def _factory(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"--kernel-factory must look like MODULE:NAME (e.g. msim:metal_kernel), got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--kernel-factory {spec}: {e}") from None


def _random_bank(experts: int, out_dim: int, in_dim: int, bits: int | None, group_size: int | None,
                 dtype: mx.Dtype) -> ExpertBank:
    """A bank of the given shape with random contents (lazy: nothing is allocated unless it is timed)."""
    if bits is None:
        return ExpertBank((mx.random.normal((experts, out_dim, in_dim)) * in_dim**-0.5).astype(dtype))
    groups = in_dim // group_size
    return ExpertBank(mx.random.randint(0, 1 << 31, (experts, out_dim, in_dim * bits // 32)).astype(mx.uint32),
                      (mx.random.uniform(shape=(experts, out_dim, groups)) * 0.02).astype(dtype),
                      (mx.random.normal((experts, out_dim, groups)) * 0.02).astype(dtype), bits=bits,
                      group_size=group_size)


def published_checks(runner, dtype: mx.Dtype = mx.bfloat16) -> dict:
    """{class key: (KernelClass, check builder)} for the published models' decode steps."""
    from .memory import load_preset

    checks = {}
    for variant in PUBLISHED:
        text = ModelConfig.from_dict(load_preset(variant)).text
        for layer, kind in enumerate(text.layer_types):
            D, kv_heads = text.layer_head_dims[layer], text.layer_kv_heads[layer]
            q = mx.zeros((1, text.num_attention_heads, 1, D), dtype)
            k = mx.zeros((1, kv_heads, 1, D), dtype)
            window = text.sliding_window if kind == "sliding_attention" else None
            klass = decode_attention.kernel_class(q, k)
            checks.setdefault(klass.key, (klass, lambda q=q, k=k, w=window: decode_attention.check(
                runner, q, k, window=w)))
        if text.enable_moe_block:
            E, H, inter = text.num_experts, text.hidden_size, text.moe_intermediate_size
            x = mx.zeros((1, H), dtype)
            for bits, group_size in EXPERT_STORAGE:
                gate_up = _random_bank(E, 2 * inter, H, bits, group_size, dtype)
                down = _random_bank(E, H, inter, bits, group_size, dtype)
                klass = expert_decode.kernel_class(x, gate_up)
                checks.setdefault(klass.key, (klass, lambda x=x, gu=gate_up, dn=down: expert_decode.check(
                    runner, x, text.top_k_experts, gu, dn)))
    return checks


def model_checks(path: str) -> dict:
    """{class key: (KernelClass, check builder)} of the classes one decode step of the model at `path` uses."""
    from .loading import load

    model, _ = load(path)
    with kernels.collect_checks() as collected:
        cache = model.make_cache()
        mx.eval(model(mx.array([[1, 2]]), cache=cache))  # a 2-token prompt, then one decode step
        mx.eval(model(mx.array([[3]]), cache=cache))
    return collected


def run(model: str | None = None, factory=None) -> dict:
    """Check every kernel class; returns the report (what --json writes)."""
    with kernels.use_kernel_factory(factory) if factory is not None else contextlib.nullcontext():
        runner = kernels.kernel_runner()
        timing = runner is not None and factory is None  # an emulator's timings say nothing about a GPU
        report = {"device": runner.device if runner is not None else f"no Metal device ({platform.machine()})",
                  "os": verdicts.environment("")["os"], "mlx": mx.__version__,
                  "package": verdicts.package_version(), "timed": timing, "classes": []}
        if runner is None:
            report["note"] = ("MLX has no Metal device here, so the Metal kernels cannot run; every call takes the "
                              "MLX path (pass --kernel-factory to check the kernels in an emulator)")
            return report
        checks = model_checks(model) if model is not None else published_checks(runner)
        for key, (klass, check) in checks.items():
            verdict = verdicts.measure(check(), timing=timing)
            if timing:
                runner.verdicts.record(klass, verdict)
            report["classes"].append({"class": key, **verdict.__dict__})
    return report


def _table(report: dict) -> str:
    rows = [f"device {report['device']}, OS {report['os']}, MLX {report['mlx']}, mlx-gemma4 {report['package']}",
            "| kernel class | compiled | agrees (max rel error) | kernel ms | MLX ms | chosen |",
            "|---|---|---|---:|---:|---|"]

    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    for c in report["classes"]:
        err = "-" if c["max_rel_error"] is None else f"{c['max_rel_error']:.1e}"
        agrees = "-" if c["agrees"] is None else f"{'yes' if c['agrees'] else 'NO'} ({err})"
        rows.append(f"| {c['class']} | {'yes' if c['compiled'] else 'NO'} | {agrees} | {ms(c['kernel_ms'])} | "
                    f"{ms(c['mlx_ms'])} | {c['chosen']}: {c['reason']} |")
    if "note" in report:
        rows.append(report["note"])
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_gemma4.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="check the kernel classes this model's decode step uses")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument("--kernel-factory", help="MODULE:NAME of a replacement for mx.fast.metal_kernel (an "
                        "emulator); checks agreement only")
    args = parser.parse_args(argv)
    report = run(args.model, _factory(args.kernel_factory) if args.kernel_factory else None)
    print(_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    failed = [c["class"] for c in report["classes"] if not c["compiled"] or c["agrees"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
