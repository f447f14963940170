"""Backend selection (a model's runtime policy, use_backend) and the kernel factory (use_kernel_factory)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import kernels
from mlx_gemma4.kernels import (ExpertBank, expert_glu, use_backend, use_kernel_factory, use_runtime_defaults,
                                windowed_attention)


def test_auto_picks_metal_only_when_available():
    on_gpu = mx.metal.is_available() and mx.default_device() == mx.gpu
    assert kernels.backend() == ("metal" if on_gpu else "mlx")
    with use_runtime_defaults(backend="auto"):
        assert kernels.backend() == ("metal" if on_gpu else "mlx")


def test_backends_are_auto_metal_mlx_only():
    with use_runtime_defaults(backend="mlx"):
        assert kernels.backend() == "mlx"
    for bad in ("emulate", "cuda"):
        for choose in (use_backend, lambda name: use_runtime_defaults(backend=name)):
            with pytest.raises(ValueError, match=f"unknown kernel backend '{bad}': expected one of auto, metal, mlx"):
                with choose(bad):
                    pass


@pytest.mark.skipif(mx.metal.is_available(), reason="checks the error raised where Metal is absent")
def test_forcing_metal_without_a_metal_device_is_a_clear_error():
    with use_runtime_defaults(backend="metal"), pytest.raises(RuntimeError, match="no Metal device"):
        kernels.backend()
    with use_backend("metal"), pytest.raises(RuntimeError, match="no Metal device"):
        windowed_attention(mx.zeros((1, 1, 1, 32)), mx.zeros((1, 1, 1, 32)), mx.zeros((1, 1, 1, 32)), scale=1.0,
                           q_start=0, k_start=0, window=None)


def test_context_managers_override_the_policy_and_nest(metal_emulator):
    with use_runtime_defaults(backend="mlx"):  # what a model loaded with kernels="mlx" runs under
        with metal_emulator():
            assert kernels.backend() == "metal"
            with use_backend("mlx"):
                assert kernels.backend() == "mlx"
            assert kernels.backend() == "metal"
        assert kernels.backend() == "mlx"


def test_kernel_factory_runs_metal_bodies():
    """An installed factory builds every kernel the Metal path runs (here msim's, which gives the same numbers
    as the MLX path), called with mx.fast.metal_kernel's arguments."""
    import msim

    built = []

    def factory(**kw):
        built.append(sorted(kw))
        return msim.metal_kernel(**kw)

    rng = np.random.default_rng(0)
    gu = ExpertBank(mx.array(rng.standard_normal((4, 64, 32)).astype(np.float32) * 0.2))
    dn = ExpertBank(mx.array(rng.standard_normal((4, 32, 32)).astype(np.float32) * 0.2))
    x = mx.array(rng.standard_normal((2, 32)).astype(np.float32))
    idx = mx.array([[0, 3], [2, 2]], mx.int32)
    w = mx.array([[0.7, 0.3], [0.5, 0.5]])
    with use_backend("mlx"):
        want = expert_glu(x, idx, w, gu, dn)
    with use_kernel_factory(factory) as runner, use_backend("metal"):
        got = expert_glu(x, idx, w, gu, dn)
    assert runner.compiled and len(built) == len(runner.compiled)
    assert built[0] == ["ensure_row_contiguous", "header", "input_names", "name", "output_names", "source"]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def _spec_calls():
    """One representative launch of every kernel spec: (spec, inputs, template, output dtypes)."""
    from mlx_gemma4.kernels import decode_attention as da
    from mlx_gemma4.kernels import expert_decode as ed

    f32, i32, bf16 = mx.float32, mx.int32, mx.bfloat16
    attn = [mx.zeros((1, 8, 1, 256), bf16), mx.zeros((1, 1, 300, 256), bf16)[:, :, :90],
            mx.zeros((1, 1, 300, 256), bf16)[:, :, :90], mx.zeros((8,), i32), mx.array(0.1, f32),
            mx.zeros((7,), i32), mx.zeros((4,), i32)]
    attn_t = [("T", bf16), ("D", 256), ("BK", 16), ("NSG", 8), ("RPS", 1)]
    parts = [mx.zeros((8, 3, 256), bf16), mx.zeros((8, 3), f32), mx.zeros((8, 3), f32), mx.zeros((7,), i32)]
    experts = [mx.zeros((2, 64), bf16), mx.zeros((16,), i32), mx.zeros((16,), i32), mx.zeros((16,), f32),
               mx.zeros((4, 64, 8), mx.uint32), mx.zeros((4, 64, 2), bf16), mx.zeros((4, 64, 2), bf16),
               mx.zeros((5,), i32)]
    experts_t = [("XT", bf16), ("WT", mx.uint32), ("ST", bf16), ("BITS", 4), ("NT", 2), ("RPL", 1),
                 ("THREADS", 256), ("CHUNK", 512), ("GLU", True), ("YT", bf16)]
    return [
        (da.PASS1_SINGLE, attn, attn_t, [bf16]),
        (da.PASS1_SPLIT, attn, attn_t, [bf16, f32, f32]),
        (da.PASS2, parts, [("T", bf16), ("D", 256), ("MAX_NB", 1024)], [bf16]),
        (ed.SPEC, experts, experts_t, [bf16]),
    ]


def test_every_spec_is_covered():
    assert {spec.name for spec, *_ in _spec_calls()} == {spec.name for spec in kernels.SPECS}


@pytest.mark.parametrize("case", range(4))
def test_emulator_compiles_the_exact_text_mlx_generates(case):
    """For every kernel spec, msim's generated kernel text (signature, address spaces, template
    instantiation) is character for character what the installed MLX hands the Metal compiler."""
    from msim.generate import ArgInfo, mlx_kernel_source
    from msim.mlx_golden import mlx_generated_source

    spec, inputs, template, out_dtypes = _spec_calls()[case]
    kernel_kw = dict(name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
                     source=spec.source, header=spec.header, ensure_row_contiguous=spec.ensure_row_contiguous)
    call_kw = dict(inputs=inputs, template=template, grid=(32, 1, 1), threadgroup=(32, 1, 1),
                   output_shapes=[(4,)] * len(out_dtypes), output_dtypes=out_dtypes)
    golden = mlx_generated_source(kernel_kw, call_kw)

    def name(d):
        return str(d).split(".")[-1]

    infos = [ArgInfo(name(a.dtype), a.ndim, a.size) for a in inputs]
    targs = [(n, v if isinstance(v, (bool, int)) else name(v)) for n, v in template]
    _, ours = mlx_kernel_source(spec.name, spec.input_names, spec.output_names, spec.source, spec.header, infos,
                                [name(d) for d in out_dtypes], targs)
    assert ours == golden


@pytest.mark.parametrize("backend_name", ["mlx", "metal"])
def test_empty_inputs_give_empty_outputs(backend_name, metal_emulator):
    gu = ExpertBank(mx.zeros((4, 64, 32)))
    dn = ExpertBank(mx.zeros((4, 32, 32)))
    with metal_emulator() if backend_name == "metal" else use_backend("mlx"):
        out = expert_glu(mx.zeros((0, 32), mx.bfloat16), mx.zeros((0, 2), mx.int32), mx.zeros((0, 2)), gu, dn)
        assert out.shape == (0, 32) and out.dtype == mx.bfloat16
        q, kv = mx.zeros((1, 2, 0, 32)), mx.zeros((1, 1, 3, 32))
        out = windowed_attention(q, kv, kv, scale=1.0, q_start=3, k_start=0, window=4)
        assert out.shape == (1, 2, 0, 32)


# ------------------------------------------------------------------------------- self-verifying dispatch


@pytest.fixture
def verdict_dir(tmp_path, monkeypatch):
    """Verdicts go to a fresh cache directory."""
    from mlx_gemma4.kernels import verdicts

    monkeypatch.setattr(verdicts, "default_cache_dir", lambda: tmp_path)
    return tmp_path


def _msim(transform=None, delay=0.0, offset=0.0):
    """A kernel factory: msim's, with each spec's source passed through `transform`, `delay` seconds added to
    every launch and `offset` added to every output (a kernel that runs but computes wrong numbers)."""
    import time

    import msim

    def factory(**kw):
        if transform is not None:
            kw["source"] = transform(kw["source"])
        kernel = msim.metal_kernel(**kw)

        def launch(**call):
            time.sleep(delay)
            outputs = kernel(**call)
            return [o + offset for o in outputs] if offset else outputs

        return launch

    return factory


def _decode_call(seed):
    """q, k, v and keywords of a small decode attention call (4 query heads over 2 KV heads, 20 keys), and its
    result on the MLX path."""
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((1, 4, 1, 32)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((1, 2, 20, 32)).astype(np.float32)) for _ in range(2))
    kw = dict(scale=0.2, q_start=19, k_start=0, window=None)
    with use_backend("mlx"):
        return q, k, v, kw, windowed_attention(q, k, v, **kw)


def test_auto_respects_the_default_device(monkeypatch):
    """With a Metal device but MLX computing on the CPU (mx.default_device()), auto takes the MLX path; with the
    GPU as the default device, the Metal kernels (each class after its self-check)."""
    monkeypatch.setattr(kernels, "_metal_available", lambda: True)
    monkeypatch.setattr(kernels, "_metal_runner", None)  # the runner built here is not kept
    assert mx.default_device() == mx.cpu
    assert kernels.backend() == "mlx"
    with use_backend("metal"):
        assert kernels.backend() == "metal"
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert kernels.backend() == "metal"


def test_invalid_kernel_body_falls_back_with_one_warning_per_class(text_checkpoint, verdict_dir):
    """Kernel bodies the compiler rejects: the model computes on the MLX path (same logits), warning once per
    kernel class, naming the reason, however many calls follow."""
    import warnings

    import checkpoints
    from mlx_gemma4 import load

    model, _ = load(text_checkpoint("26b"), dtype="float32")
    ids = mx.array(np.random.RandomState(0).randint(3, checkpoints.VOCAB, (1, 12)))

    def logits():
        cache = model.make_cache()
        outs = [model(ids[:, :9], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(9, 12)]
        return np.concatenate([np.array(o) for o in outs], axis=1)

    with use_backend("mlx"):
        want = logits()
    with warnings.catch_warnings(record=True) as caught, use_kernel_factory(_msim(lambda s: s + "\n not msl;\n")):
        warnings.simplefilter("always")
        got = logits()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages and all("did not compile or run" in m for m in messages)
    classes = [m.split("the Metal kernel for ")[1].split(" is not used")[0] for m in messages]
    assert len(classes) == len(set(classes))  # once per class
    assert any(c.startswith("decode_attention/") for c in classes)
    assert any(c.startswith("expert_decode/") for c in classes)
    np.testing.assert_array_equal(got, want)


def test_slow_kernel_is_not_chosen_and_a_faster_one_is(verdict_dir, monkeypatch):
    """The timing decides: a kernel slower than the MLX path is not used (one warning), one faster than it is."""
    import warnings

    from mlx_gemma4.kernels import decode_attention as da

    monkeypatch.setattr(da, "TIMING_CONTEXT", 40)  # emulated timing runs stay short
    q, k, v, kw, want = _decode_call(0)

    with pytest.warns(RuntimeWarning, match="slower than the MLX path"):
        with use_kernel_factory(_msim(delay=0.05)) as runner:
            got = windowed_attention(q, k, v, **kw)
    (verdict,) = runner.verdicts._load().values()
    assert verdict.chosen == "mlx" and verdict.kernel_ms > verdict.mlx_ms and verdict.agrees
    assert mx.array_equal(got, want)  # the MLX path ran

    mlx_path = da.windowed_attention_mlx

    def slow_mlx(*args, **kwargs):
        import time

        time.sleep(0.5)
        return mlx_path(*args, **kwargs)

    monkeypatch.setattr(da, "windowed_attention_mlx", slow_mlx)  # what the self-check times the kernel against
    (verdict_dir / "kernel-verdicts.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with use_kernel_factory(_msim()) as runner:
            got = windowed_attention(q, k, v, **kw)
    (verdict,) = runner.verdicts._load().values()
    assert verdict.chosen == "metal" and verdict.kernel_ms < verdict.mlx_ms, verdict
    assert runner.compiled >= {da.PASS1_SINGLE.name}
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:mlx-gemma4. the Metal kernel for k/")  # equal timings: "slower"
def test_verdicts_are_cached_per_environment_and_kernel_source(tmp_path, monkeypatch):
    from mlx_gemma4.kernels import verdicts

    measured = []

    def check():
        measured.append(1)
        one = mx.ones((4,))
        return verdicts.Check(lambda: one, lambda: one, lambda: (lambda: one, lambda: one), mx.float32)

    klass = verdicts.KernelClass("k", (("dtype", "float32"),), "abc")
    first = verdicts.VerdictStore("gpu-a", tmp_path)
    verdict = first.verdict(klass, check)
    assert len(measured) == 1 and verdict.compiled and verdict.agrees
    assert first.verdict(klass, check) == verdict and len(measured) == 1  # the process keeps it
    saved = json.loads((tmp_path / verdicts.CACHE_FILE).read_text())
    assert saved["environment"] == verdicts.environment("gpu-a")
    assert set(saved["environment"]) == {"device", "os", "mlx", "package"}

    assert verdicts.VerdictStore("gpu-a", tmp_path).verdict(klass, check) == verdict  # a new process: the file
    assert len(measured) == 1
    changed = verdicts.KernelClass("k", (("dtype", "float32"),), "def")  # the kernel's source changed
    verdicts.VerdictStore("gpu-a", tmp_path).verdict(changed, check)
    assert len(measured) == 2

    real_environment = verdicts.environment
    for field in ("device", "os", "mlx", "package"):  # another device, macOS, MLX or package: verified again
        where = tmp_path / field
        verdicts.VerdictStore("gpu-a", where).verdict(klass, check)
        verdicts.VerdictStore("gpu-a", where).verdict(klass, check)
        before = len(measured)
        monkeypatch.setattr(verdicts, "environment", lambda device, f=field: {**real_environment(device), f: "new"})
        verdicts.VerdictStore("gpu-a", where).verdict(klass, check)
        assert len(measured) == before + 1, field
        assert json.loads((where / verdicts.CACHE_FILE).read_text())["environment"][field] == "new"
        monkeypatch.setattr(verdicts, "environment", real_environment)

    (tmp_path / verdicts.CACHE_FILE).write_text("{not json")  # a damaged file: verified again, and replaced
    before = len(measured)
    assert verdicts.VerdictStore("gpu-a", tmp_path).verdict(klass, check).agrees
    assert len(measured) == before + 1
    assert klass.key in json.loads((tmp_path / verdicts.CACHE_FILE).read_text())["verdicts"]


def test_verdicts_live_in_the_user_cache_dir(tmp_path, monkeypatch):
    """~/Library/Caches/mlx-gemma4 on macOS; $XDG_CACHE_HOME/mlx-gemma4, else ~/.cache/mlx-gemma4, elsewhere."""
    from pathlib import Path

    from mlx_gemma4.kernels import verdicts

    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    monkeypatch.setattr(verdicts.sys, "platform", "darwin")
    assert verdicts.VerdictStore("gpu").path == tmp_path / "home/Library/Caches/mlx-gemma4" / verdicts.CACHE_FILE
    monkeypatch.setattr(verdicts.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert verdicts.default_cache_dir() == tmp_path / "xdg/mlx-gemma4"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert verdicts.default_cache_dir() == tmp_path / "home/.cache/mlx-gemma4"


def test_forcing_metal_skips_the_self_check(verdict_dir):
    q = mx.zeros((1, 2, 1, 32))
    kv = mx.zeros((1, 1, 5, 32))
    with use_runtime_defaults(backend="metal"), use_kernel_factory(_msim()) as runner:
        windowed_attention(q, kv, kv, scale=1.0, q_start=4, k_start=0, window=None)
    assert runner.compiled and not runner.verdicts._load()


def test_kernel_that_disagrees_is_not_used(verdict_dir):
    """A kernel that runs but computes wrong numbers fails the agreement check: the MLX path runs, with one warning
    naming the error however many calls follow, and the verdict is kept."""
    import warnings

    q, k, v, kw, want = _decode_call(1)
    with warnings.catch_warnings(record=True) as caught, use_kernel_factory(_msim(offset=1.0)) as runner:
        warnings.simplefilter("always")
        got = [windowed_attention(q, k, v, **kw) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "disagrees with the MLX path (max rel error" in messages[0], messages
    (verdict,) = runner.verdicts._load().values()
    assert verdict.compiled and verdict.agrees is False and verdict.chosen == "mlx" and verdict.max_rel_error > 0.1
    assert verdict.kernel_ms is None  # not timed: it failed first
    assert all(mx.array_equal(g, want) for g in got)


def test_the_models_policy_chooses_the_backend(text_checkpoint, verdict_dir, monkeypatch):
    """With a kernel factory installed (as a Metal GPU would be), what load() was told decides: kernels="mlx" (or
    MLX_GEMMA4_KERNELS=mlx when load() is not told) runs no kernel, "metal" runs them unchecked (no verdict),
    "auto" runs the self-check first (a verdict per kernel class)."""
    import warnings

    from mlx_gemma4 import load
    from mlx_gemma4.kernels import decode_attention as da
    from mlx_gemma4.kernels import expert_decode as ed

    monkeypatch.setattr(da, "TIMING_CONTEXT", 40)  # emulated timing runs stay short
    path = text_checkpoint("26b")
    ids = mx.array([[5, 6, 7, 8, 9]])

    def decode_step(model):
        cache = model.make_cache()
        model(ids[:, :4], cache=cache)
        return model(ids[:, 4:], cache=cache)

    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "mlx")
    by_environment, _ = load(path, dtype="float32")
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "metal")
    by_argument, _ = load(path, dtype="float32", kernels="mlx")  # the argument wins over the environment
    for model in (by_environment, by_argument):
        with use_kernel_factory(_msim()) as runner:
            decode_step(model)
        assert model.policy.kernel_backend == "mlx" and not runner.compiled

    forced, _ = load(path, dtype="float32")  # MLX_GEMMA4_KERNELS=metal
    with use_kernel_factory(_msim()) as runner:
        decode_step(forced)
    assert runner.compiled >= {da.PASS1_SINGLE.name, ed.SPEC.name} and not runner.verdicts._load()

    monkeypatch.delenv("MLX_GEMMA4_KERNELS")
    checked, _ = load(path, dtype="float32")
    with warnings.catch_warnings(), use_kernel_factory(_msim()) as runner:
        warnings.simplefilter("ignore")  # the emulator may well be "slower than the MLX path"
        decode_step(checked)
    assert {key.split("/")[0] for key in runner.verdicts._load()} == {"decode_attention", "expert_decode"}


def test_macos_requires_the_mlx_the_kernels_were_written_against():
    """The kernels' bodies are checked against the text MLX 0.32's metal_kernel generates
    (test_emulator_compiles_the_exact_text_mlx_generates): on macOS the package must not install an older MLX."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python >= 3.11) reads pyproject.toml")
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    on_mac = [r for r in map(Requirement, project["dependencies"])
              if r.name == "mlx" and (r.marker is None or r.marker.evaluate({"sys_platform": "darwin"}))]
    assert len(on_mac) == 1, on_mac
    assert on_mac[0].specifier.contains("0.32.0") and not on_mac[0].specifier.contains("0.31.9")
