"""msim's per-launch counters: device bytes read and written (every load and store the kernel executes),
threadgroups, threads per threadgroup, barriers, and the report / traffic-ratio helpers."""

import numpy as np
import pytest

import msim
from msim import counters

# each thread reads its element of `a` and its neighbour's (every element is read twice), one element of `b` when
# its index is even, the scalar once, and writes one float; one barrier per threadgroup
SOURCE = """
  threadgroup float shared[64];
  const uint i = thread_position_in_grid.x;
  float v = a[i] + a[(i + 1) % 256] * s;
  if ((i & 1u) == 0u) {
    v += b[i / 2];
  }
  shared[thread_index_in_threadgroup] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = shared[thread_index_in_threadgroup];
"""


def test_counts_every_device_access():
    k = msim.metal_kernel("counted", ["a", "b", "s"], ["out"], SOURCE)
    a = np.arange(256, dtype=np.float32)
    b = np.ones(300, np.float32)  # only the first 128 elements are read
    with counters.record() as launches:
        (out,) = k(inputs=[a, b, 2.0], output_shapes=[(256,)], output_dtypes=[np.float32], grid=(256, 1, 1),
                   threadgroup=(64, 1, 1))
    np.testing.assert_allclose(out, a + 2 * np.roll(a, -1) + (np.arange(256) % 2 == 0))
    (launch,) = launches
    assert launch.buffers["a"][:2] == (2 * 256 * 4, 0)
    assert launch.buffers["b"][:2] == (128 * 4, 0)
    assert launch.buffers["out"][:2] == (0, 256 * 4)
    assert launch.buffers["s"] == (256 * 4, 0, "constant")  # a scalar: MLX's constant address space
    assert launch.bytes_read == (2 * 256 + 128) * 4 and launch.bytes_written == 256 * 4
    assert launch.constant_bytes_read == 256 * 4
    assert (launch.threadgroups, launch.threads_per_threadgroup, launch.barriers) == (4, 64, 4)
    assert launch.loads_by_width["4"] == 2 * 256 + 128 + 256
    assert counters.traffic_ratio(launches, a.nbytes + 128 * 4) == pytest.approx((2 * 256 + 128) / (256 + 128))
    table = counters.report(launches, a.nbytes)
    assert "| counted |" in table and "ratio 2.500" in table


def test_strided_inputs_are_read_in_place():
    """With ensure_row_contiguous=False a strided view keeps its strides: only the viewed elements are read."""
    mx = pytest.importorskip("mlx.core")
    src = "const uint i = thread_position_in_grid.x; out[i] = x[i * x_strides[0]];"
    k = msim.metal_kernel("strided", ["x"], ["out"], src, ensure_row_contiguous=False)
    x = mx.arange(64, dtype=mx.float32)[::4]
    with counters.record() as launches:
        (out,) = k(inputs=[x], output_shapes=[(16,)], output_dtypes=[mx.float32], grid=(16, 1, 1),
                   threadgroup=(16, 1, 1))
    assert np.array(out).tolist() == list(range(0, 64, 4))
    assert launches[0].inputs["x"] == ((16,), (4,))
    assert launches[0].buffers["x"][0] == 16 * 4


def test_not_counting_outside_a_recording():
    k = msim.metal_kernel("plain", ["a"], ["out"], "out[thread_position_in_grid.x] = a[thread_position_in_grid.x];")
    (_, stats) = k(inputs=[np.ones(8, np.float32)], output_shapes=[(8,)], output_dtypes=[np.float32],
                   grid=(8, 1, 1), threadgroup=(8, 1, 1), return_stats=True)
    assert "bytes_read" not in stats
    with pytest.raises(ValueError, match="minimum_bytes must be positive"):
        counters.traffic_ratio([], 0)
