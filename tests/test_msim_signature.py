"""The emulator's signature generator must produce exactly MLX's text (installed MLX)."""
import mlx.core as mx
import numpy as np
import pytest

import msim


@pytest.fixture(autouse=True)
def _race_checks():
    """Every launch runs forward and reverse schedules and must agree bit for bit."""
    msim.set_defaults(check_order=True)
    yield
    msim.set_defaults(check_order=False)
from msim.generate import ArgInfo, mlx_kernel_source
from msim.mlx_golden import mlx_generated_source

BODY_ATTRS = """
    uint i = thread_position_in_grid.x + threads_per_threadgroup.x * 0;
    uint l = thread_index_in_simdgroup; uint s = simdgroup_index_in_threadgroup;
    uint3 g = threadgroup_position_in_grid; // dispatch_threads_per_threadgroup
    out0[i] = T(x[i]) + T(x_shape[0] + x_strides[0] + x_ndim) + T(w[0]) + T(sc) + T(N);
"""

CASES = [
    # (kernel kwargs, call kwargs builder)
    (dict(name="basic", input_names=["x"], output_names=["out0"],
          source="uint i = thread_position_in_grid.x; out0[i] = x[i];"),
     lambda: dict(inputs=[mx.zeros((16,), mx.float16)], output_shapes=[(16,)], output_dtypes=[mx.float16],
                  grid=(16, 1, 1), threadgroup=(16, 1, 1))),
    (dict(name="attrs", input_names=["x", "w", "sc"], output_names=["out0"], source=BODY_ATTRS,
          header="// helper header\n"),
     lambda: dict(inputs=[mx.zeros((4, 8), mx.bfloat16), mx.zeros((3,), mx.uint32), 2.5],
                  output_shapes=[(32,)], output_dtypes=[mx.float32], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                  template=[("T", mx.float32), ("N", 7), ("B", True)])),
    (dict(name="atomic", input_names=["x"], output_names=["a", "b"], atomic_outputs=True,
          source="uint i = thread_index_in_threadgroup; atomic_fetch_add_explicit(&a[0], x[i], memory_order_relaxed);"),
     lambda: dict(inputs=[mx.zeros((64,), mx.int32)], output_shapes=[(1,), (1,)], output_dtypes=[mx.int32, mx.int32],
                  grid=(64, 1, 1), threadgroup=(64, 1, 1), init_value=0)),
    # MLX quirk: with shape/stride buffers, 2 outputs and no attributes the generated
    # signature closes after the first output (index vs inputs.size()+outputs.size()-1).
    (dict(name="quirk", input_names=["x"], output_names=["a", "b"], source="a[0] = x_shape[0]; b[0] = 1;"),
     lambda: dict(inputs=[mx.zeros((9,), mx.float32)], output_shapes=[(1,), (1,)],
                  output_dtypes=[mx.float32, mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))),
]


def _dt(d):
    return str(d).split(".")[-1]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_mlx(case):
    kkw, mk = CASES[case]
    ckw = mk()
    golden = mlx_generated_source(kkw, ckw)
    infos = []
    for x in ckw["inputs"]:
        if isinstance(x, mx.array):
            infos.append(ArgInfo(_dt(x.dtype), x.ndim, x.size))
        else:
            infos.append(ArgInfo("float32" if isinstance(x, float) else "int32", 0, 1))
    targs = [(n, v if isinstance(v, (bool, int)) else _dt(v)) for n, v in ckw.get("template", [])]
    _, ours = mlx_kernel_source(kkw["name"], kkw["input_names"], kkw["output_names"], kkw["source"],
                                kkw.get("header", ""), infos, [_dt(d) for d in ckw["output_dtypes"]], targs,
                                kkw.get("atomic_outputs", False))
    assert ours == golden


def test_quirk_signature_is_malformed():
    kkw, mk = CASES[3]
    golden = mlx_generated_source(kkw, mk())
    assert "device float* a [[buffer(2)]]) {\n  device float* b" in golden
