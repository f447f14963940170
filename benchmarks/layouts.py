"""Loading the same quantized checkpoint from the mlx-vlm layout and from our earlier layout, side by side with
mlx-vlm's own loader; and the expert product with the gate/up banks fused (ours) or split (SwitchGLU's).

    python benchmarks/layouts.py --source DIR [--repeat 3] [--tokens 1,512] [--json out.json]

DIR is one of our MLX checkpoints (e.g. `python -m mlx_gemma4.synth --variant 26b-a4b --bits 4 --layers 10`).
It is rewritten tensor by tensor into the mlx-vlm layout next to it (DIR-mlx-vlm: same values, names and
expert banks as `mlx_vlm.convert` writes them), then each loader runs `--repeat` times, each in its own process,
alternating layouts (the page cache holds both after the first round; the first round is dropped):

  mlx-gemma4 / ours      load(DIR)                (fused gate/up banks read as stored)
  mlx-gemma4 / mlx-vlm   load(DIR-mlx-vlm)        (split banks concatenated while the weights are evaluated)
  mlx-vlm / mlx-vlm      mlx_vlm.utils.load_model (its own tree: split SwitchGLU banks)

Reported: seconds until every weight is evaluated, the process's max RSS and MLX's peak memory counter, and the
max difference of the two mlx-gemma4 loads' logits on a short prompt (must be 0: same model either way).

The expert product (`--tokens`): one 26B-A4B MoE layer's experts (128 x 704, top-8 of 128, hidden 2816, 4-bit
group 64) on T tokens, through our dispatch (`kernels.expert_glu`, fused gate/up bank) and through the same
code paths with the gate and up banks as two separate matrices (two products where ours has one).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOADERS = ("mlx-gemma4:ours", "mlx-gemma4:mlx-vlm", "mlx-vlm:mlx-vlm")
PROMPT = [2, 106, 1645, 108, 3689, 603, 573, 6037, 576, 6081, 235336, 107, 108]


def relayout(src: Path, dst: Path) -> Path:
    """Write our-layout checkpoint `src` in the mlx-vlm layout at `dst`, one shard at a time."""
    import mlx.core as mx

    from mlx_gemma4 import layouts
    from mlx_gemma4.config import ModelConfig

    dst.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    weight_map = {}
    for shard in sorted(f.name for f in src.glob("*.safetensors")):
        tensors = layouts.to_mlx_layout(mx.load(str(src / shard)))
        mx.save_safetensors(str(dst / shard), tensors, metadata={"format": "mlx"})
        weight_map.update({k: shard for k in tensors})
        del tensors
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quant = raw.get("quantization")
    entry = dict(quant, mode="affine") if quant else None
    config = layouts.mlx_config(raw, ModelConfig.from_dict(raw), entry, "mlx-vlm")
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def peak_rss_gb() -> float:
    """This process's peak RSS. Linux: VmHWM (ru_maxrss survives exec, so a child would report its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30  # macOS: bytes


def worker(loader: str, path: Path) -> dict:
    """Load `path` with `loader` and report the time, memory and logits of a short prompt."""
    import mlx_gemma4  # noqa: F401  (optimized BLAS before mlx.core)

    import mlx.core as mx
    from mlx.utils import tree_flatten

    system = loader.split(":")[0]
    start = time.perf_counter()
    if system == "mlx-gemma4":
        from mlx_gemma4 import load

        model, _ = load(str(path))
    else:
        from mlx_vlm.utils import load_model

        model = load_model(path)
    mx.eval(model.parameters())
    seconds = time.perf_counter() - start
    out = {"loader": loader, "load_s": seconds, "rss_gb": peak_rss_gb(),
           "mlx_peak_gb": mx.get_peak_memory() / 1e9,
           "weights_gb": sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9}
    if system == "mlx-gemma4":
        out["logits"] = model(mx.array([PROMPT]))[0, -1].tolist()
    return out


def run_loaders(source: Path, target: Path, repeat: int) -> list[dict]:
    results = []
    for round_ in range(repeat + 1):
        for loader in LOADERS:
            path = source if loader.endswith(":ours") else target
            proc = subprocess.run([sys.executable, __file__, "--worker", loader, str(path)], capture_output=True,
                                  text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {round_}: {loader} {result['load_s']:.2f} s, RSS {result['rss_gb']:.2f} GB",
                  file=sys.stderr)
            if round_:  # round 0 fills the page cache
                results.append(result)
    return results


def expert_products(tokens: list[int], repeat: int) -> list[dict]:
    """Min seconds of one 26B MoE layer's experts on T tokens, gate/up fused vs split."""
    import mlx_gemma4  # noqa: F401

    import mlx.core as mx
    import numpy as np

    from mlx_gemma4.kernels import ExpertBank, expert_glu, gather_experts as ge

    E, H, inter, K, gs, bits = 128, 2816, 704, 8, 64, 4

    def bank(out_dim, in_dim, seed):
        w = mx.random.normal((E, out_dim, in_dim), key=mx.random.key(seed)) * 0.02
        q, s, b = mx.quantize(w, group_size=gs, bits=bits)
        mx.eval(q, s, b)
        return ExpertBank(q, s, b, bits, gs)

    gate, up, down = bank(inter, H, 1), bank(inter, H, 2), bank(H, inter, 3)
    fused = ExpertBank(*(mx.concatenate([getattr(gate, f), getattr(up, f)], axis=1)
                         for f in ("weight", "scales", "biases")), bits, gs)
    mx.eval(fused.weight, fused.scales, fused.biases)

    def split_glu(x, indices, weights):
        """Our MLX paths with gate and up as two products (SwitchGLU's layout)."""
        T = x.shape[0]
        if indices.size >= ge.SORT_MIN_PAIRS and mx.default_device() == mx.cpu:
            flat = indices.reshape(-1)
            order = mx.argsort(flat)
            counts = np.bincount(np.array(flat), minlength=E).tolist()
            h = x[order // K]
            outs, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    rows = h[start:start + n]
                    act = ge.gelu_tanh(ge._expert_matmul(rows, gate, e)) * ge._expert_matmul(rows, up, e)
                    outs.append(ge._expert_matmul(act, down, e))
                    start += n
            y = mx.concatenate(outs)[mx.argsort(order)].reshape(T, K, -1)
        else:
            experts = indices.astype(mx.uint32)
            h = x[:, None, None, :]
            act = ge.gelu_tanh(ge._gather_matmul(h, gate, experts, False)) * ge._gather_matmul(h, up, experts, False)
            y = ge._gather_matmul(act, down, experts, False).squeeze(-2)
        return (y * weights[..., None]).sum(axis=1)

    rows = []
    for T in tokens:
        x = mx.random.normal((T, H), key=mx.random.key(T))
        indices = mx.argsort(mx.random.uniform(shape=(T, E), key=mx.random.key(T + 1)), axis=-1)[:, :K]
        indices = indices.astype(mx.int32)
        weights = mx.softmax(mx.random.normal((T, K), key=mx.random.key(T + 2)), axis=-1)
        mx.eval(x, indices, weights)
        fns = {"fused": lambda: expert_glu(x, indices, weights, fused, down),
               "split": lambda: split_glu(x, indices, weights)}
        samples = {name: [] for name in fns}
        for _ in range(repeat + 1):  # interleaved, so load from other processes hits both alike; first dropped
            for name, fn in fns.items():
                start = time.perf_counter()
                mx.eval(fn())
                samples[name].append(time.perf_counter() - start)
        times = {name: min(v[1:]) for name, v in samples.items()}
        diff = float(mx.abs(expert_glu(x, indices, weights, fused, down) - split_glu(x, indices, weights)).max())
        rows.append({"tokens": T, "fused_s": times["fused"], "split_s": times["split"], "max_diff": diff})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, help="one of our MLX checkpoints (our earlier layout)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", default="1,512", help="token counts for the expert product ('' to skip)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return
    report: dict = {}
    if args.source:
        target = args.source.with_name(args.source.name + "-mlx-vlm")
        if not (target / "config.json").exists():
            relayout(args.source, target)
        results = run_loaders(args.source, target, args.repeat)
        logits = {r["loader"]: r.pop("logits") for r in results if "logits" in r}
        same = max(abs(a - b) for a, b in zip(logits["mlx-gemma4:ours"], logits["mlx-gemma4:mlx-vlm"]))
        print(f"\n{args.source} ({results[0]['weights_gb']:.2f} GB of weights); max |logit difference| between "
              f"the two mlx-gemma4 loads: {same}\n")
        print("| loader | layout | load s (min / median) | peak RSS GB | MLX peak GB |\n|---|---|---:|---:|---:|")
        for loader in LOADERS:
            rs = [r for r in results if r["loader"] == loader]
            t = [r["load_s"] for r in rs]
            system, layout = loader.split(":")
            print(f"| {system} | {layout} | {min(t):.2f} / {statistics.median(t):.2f} | "
                  f"{max(r['rss_gb'] for r in rs):.2f} | {max(r['mlx_peak_gb'] for r in rs):.2f} |")
        report["loads"] = results
        report["logit_max_diff"] = same
    if args.tokens:
        rows = expert_products([int(t) for t in args.tokens.split(",")], args.repeat)
        print("\n| tokens | fused gate/up (ours) s, min | split gate/up s, min | split / fused | max diff |\n"
              "|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['tokens']} | {r['fused_s']:.4f} | {r['split_s']:.4f} | {r['split_s'] / r['fused_s']:.2f} | "
                  f"{r['max_diff']:.1e} |")
        report["experts"] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
