"""Backend selection (a model's runtime policy, use_backend) and the kernel factory (use_kernel_factory)."""

from __future__ import annotations

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
    from mlx_gemma4.kernels import gather_experts as ge
    from mlx_gemma4.kernels import sliding_attention as sa

    f32, i32 = mx.float32, mx.int32
    q4 = [mx.zeros((4, 64, 8), mx.uint32), mx.zeros((4, 64, 2), mx.bfloat16), mx.zeros((4, 64, 2), mx.bfloat16)]
    q4_t = [("WT", mx.uint32), ("ST", mx.bfloat16), ("BITS", 4), ("GS", 32)]
    params = mx.zeros((8,), i32)
    attn = [mx.zeros((1, 4, 9, 256), mx.float16), mx.zeros((1, 2, 9, 256), mx.float16),
            mx.zeros((1, 2, 9, 256), mx.float16), mx.zeros((9,), i32), mx.array(0.1, f32), params]
    return [
        (ge.DECODE_GATE_UP, [mx.zeros((2, 64), mx.bfloat16), mx.zeros((4,), i32), *q4, params], q4_t, [f32]),
        (ge.DECODE_DOWN, [mx.zeros((4, 32), f32), mx.zeros((4,), i32), mx.zeros((4,), f32), *q4, params],
         [*q4_t, ("OutT", mx.bfloat16)], [mx.bfloat16]),
        (ge.PREFILL, [mx.zeros((9, 64), f32), mx.zeros((18,), i32), mx.zeros((18,), i32), mx.zeros((18,), f32),
                      mx.zeros((4, 64, 64), f32), mx.zeros((8,), f32), mx.zeros((8,), f32), params],
         [("WT", f32), ("ST", f32), ("BITS", 0), ("GS", 32), ("BM", 8), ("CHUNK", 128), ("RSG", 8), ("GLU", True)],
         [f32]),
        (sa.PREFILL, attn, [("T", mx.float16), ("D", 256), ("BQ", 8), ("BK", 16)], [mx.float16, i32]),
        (sa.DECODE, attn, [("T", mx.float16), ("D", 256), ("NSG", 8)], [mx.float16]),
    ]


@pytest.mark.parametrize("case", range(5))
def test_emulator_compiles_the_exact_text_mlx_generates(case):
    """For every kernel spec, msim's generated kernel text (signature, address spaces, template
    instantiation) is character for character what the installed MLX hands the Metal compiler."""
    from msim.generate import ArgInfo, mlx_kernel_source
    from msim.mlx_golden import mlx_generated_source

    spec, inputs, template, out_dtypes = _spec_calls()[case]
    kernel_kw = dict(name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
                     source=spec.source, header=spec.header)
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
