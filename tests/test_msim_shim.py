"""Unit tests of the MSL shim itself: simd collectives, vectors, half/bfloat, atomics, simdgroup_matrix."""
import numpy as np
import pytest

import msim


@pytest.fixture(autouse=True)
def _race_checks():
    """Every launch runs forward and reverse schedules and must agree bit for bit."""
    msim.set_defaults(check_order=True)
    yield
    msim.set_defaults(check_order=False)


def run(src, inputs, out_shapes, out_dtypes, grid, tg, header="", **kw):
    k = msim.metal_kernel("t", [f"in{i}" for i in range(len(inputs))], [f"out{i}" for i in range(len(out_shapes))],
                          src, header=header, **{k: kw.pop(k) for k in list(kw) if k in ("atomic_outputs",)})
    return k(inputs=inputs, output_shapes=out_shapes, output_dtypes=out_dtypes, grid=grid, threadgroup=tg, **kw)


def test_simd_collectives():
    src = """
    uint g = thread_position_in_grid.x; uint l = thread_index_in_simdgroup;
    float v = in0[g];
    int base = g * 10;
    out0[base + 0] = simd_sum(v);
    out0[base + 1] = simd_max(v);
    out0[base + 2] = simd_min(v);
    out0[base + 3] = simd_prefix_inclusive_sum(v);
    out0[base + 4] = simd_prefix_exclusive_sum(v);
    out0[base + 5] = simd_shuffle(v, (l + 5) % 32);
    out0[base + 6] = simd_shuffle_xor(v, 3);
    out0[base + 7] = simd_shuffle_down(v, 4);
    out0[base + 8] = simd_broadcast(v, 7);
    out0[base + 9] = float(uint64_t(simd_ballot(v > 0.0f)) & 0xFFFFFFFFu);
    """
    rng = np.random.default_rng(0)
    x = rng.integers(-8, 8, 64).astype(np.float32)
    (o,) = run(src, [x], [(640,)], [np.float32], (64, 1, 1), (64, 1, 1))
    o = o.reshape(64, 10)
    for s in range(2):
        v = x[32 * s:32 * s + 32]
        r = o[32 * s:32 * s + 32]
        lane = np.arange(32)
        assert (r[:, 0] == v.sum()).all() and (r[:, 1] == v.max()).all() and (r[:, 2] == v.min()).all()
        assert (r[:, 3] == np.cumsum(v)).all() and (r[:, 4] == np.cumsum(v) - v).all()
        assert (r[:, 5] == v[(lane + 5) % 32]).all() and (r[:, 6] == v[lane ^ 3]).all()
        assert (r[:, 7] == np.where(lane + 4 < 32, v[np.minimum(lane + 4, 31)], v)).all()
        assert (r[:, 8] == v[7]).all()
        assert (r[:, 9] == float(sum(1 << i for i in range(32) if v[i] > 0))).all()


def test_partial_simdgroup_and_nonuniform_threadgroups():
    # grid 50 with threadgroup 40 -> threadgroups of 40 and 10 threads (dispatchThreads semantics)
    src = """
    uint g = thread_position_in_grid.x;
    float s = simd_sum(1.0f);
    out0[g] = s + 1000.0f * threads_per_threadgroup.x + 100000.0f * dispatch_threads_per_threadgroup.x;
    """
    (o,) = run(src, [np.zeros(1, np.float32)], [(50,)], [np.float32], (50, 1, 1), (40, 1, 1))
    exp = np.array([32] * 32 + [8] * 8 + [10] * 10) + 1000.0 * np.array([40] * 40 + [10] * 10) + 4e6
    np.testing.assert_array_equal(o, exp)


def test_vectors_half_bfloat():
    src = """
    uint i = thread_position_in_grid.x;
    float4 a = ((const device float4*)in0)[i];
    half4 h = half4(a);
    float2 xy = a.xy;
    float3 v3 = float3(xy, a.w);
    a.zw = float2(a.y, a.x);
    float d = dot(a, float4(1.0f));
    bfloat b = bfloat(a.x) * bfloat(3);
    ((device float4*)out0)[i] = float4(d, float(h.x * h.y), v3.z + length(float2(3, 4)), float(b));
    """
    x = np.arange(16, dtype=np.float32).reshape(4, 4) + 0.5
    (o,) = run(src, [x], [(4, 4)], [np.float32], (4, 1, 1), (4, 1, 1))
    a = x.copy()
    exp = np.stack([a[:, 0] + a[:, 1] + a[:, 1] + a[:, 0],
                    (a[:, 0].astype(np.float16) * a[:, 1].astype(np.float16)).astype(np.float32),
                    a[:, 3] + 5, a[:, 0] * 3], 1)
    np.testing.assert_allclose(o, exp, rtol=4e-3)


def test_atomic_outputs_and_init_value():
    src = """
    uint i = thread_position_in_grid.x;
    atomic_fetch_add_explicit(&out0[in0[i] % 4], 1, memory_order_relaxed);
    """
    x = np.arange(1000, dtype=np.int32)
    (o,) = run(src, [x], [(4,)], [np.int32], (1000, 1, 1), (256, 1, 1), atomic_outputs=True, init_value=0,
               check_order=True, workers=2)
    assert o.tolist() == [250] * 4


def test_simdgroup_matrix_mma():
    src = """
    simdgroup_float8x8 A, B, C = make_filled_simdgroup_matrix<float, 8, 8>(1.0f), D;
    simdgroup_load(A, in0, 8);
    simdgroup_load(B, in1, 8);
    simdgroup_multiply_accumulate(D, A, B, C);
    D.thread_elements()[0] += 0.0f;   // per-lane fragment access (MLX mma.h layout)
    simdgroup_store(D, out0, 8);
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    (o,) = run(src, [a, b], [(8, 8)], [np.float32], (32, 1, 1), (32, 1, 1))
    np.testing.assert_allclose(o, a @ b + 1, rtol=1e-5, atol=1e-5)


def test_threadgroup_memory_limit():
    src = """
    threadgroup float big[9000];
    big[thread_index_in_threadgroup] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[0] = big[0];
    """
    with pytest.raises(msim.KernelError, match="exceeds the limit of 32768"):
        run(src, [np.zeros(1, np.float32)], [(1,)], [np.float32], (32, 1, 1), (32, 1, 1))


def test_uninitialised_threadgroup_memory_reads_nan():
    src = """
    threadgroup float s[64];
    if (thread_index_in_threadgroup < 32) s[thread_index_in_threadgroup] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[thread_index_in_threadgroup] = s[thread_index_in_threadgroup];
    """
    (o,) = run(src, [np.zeros(1, np.float32)], [(64,)], [np.float32], (64, 1, 1), (64, 1, 1))
    assert (o[:32] == 1).all() and np.isnan(o[32:]).all()


def test_threadgroup_declaration_forms_and_header_helpers():
    header = """
    template <typename T>
    METAL_FUNC T block_sum(T v, threadgroup T* smem, uint lane, uint sg, uint nsg) {
        v = simd_sum(v);
        if (lane == 0) smem[sg] = v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        T r = lane < nsg ? smem[lane] : T(0);
        r = simd_sum(r);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        return r;
    }
    """
    src = """
    threadgroup float smem[32];
    threadgroup float4 quad[2], other[3];
    threadgroup vec<float, 2> pairs[4];
    threadgroup atomic_uint counter;
    uint tid = thread_index_in_threadgroup;
    if (tid == 0) atomic_store_explicit(&counter, 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&counter, 1u, memory_order_relaxed);
    threadgroup float* p = smem;   // pointer into threadgroup memory: not a declaration of storage
    float s = block_sum(in0[thread_position_in_grid.x], p, thread_index_in_simdgroup,
                        simdgroup_index_in_threadgroup, simdgroups_per_threadgroup);
    if (tid < 2) quad[tid] = float4(s);
    if (tid < 4) pairs[tid] = float2(tid, s);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[thread_position_in_grid.x] = quad[1].w + pairs[3].x + atomic_load_explicit(&counter, memory_order_relaxed);
    """
    x = np.ones(256, np.float32)
    (o,) = run(src, [x], [(256,)], [np.float32], (256, 1, 1), (128, 1, 1), header=header, check_order=True)
    assert (o == 128 + 3 + 128).all()


def test_non_contiguous_input_with_strides():
    # the example from MLX's custom_metal_kernels.rst, with ensure_row_contiguous=False
    src = """
        uint elem = thread_position_in_grid.x;
        // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
        // NB: elem_to_loc(elem, ...) with a `uint elem` deduces IdxT=uint, so negative strides
        // wrap around to a huge offset (msim reports the wild access); use a signed index type.
        int64_t loc = elem_to_loc<int64_t>(int64_t(elem), inp_shape, inp_strides, inp_ndim);
        T tmp = inp[loc];
        out[elem] = metal::exp(tmp);
    """
    k = msim.metal_kernel("myexp_strided", ["inp"], ["out"], src, ensure_row_contiguous=False)
    base = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    a = base[::2, ::-1].T  # non-contiguous, negative stride
    (o,) = k(inputs=[a], template=[("T", np.float32)], grid=(a.size, 1, 1), threadgroup=(32, 1, 1),
             output_shapes=[a.shape], output_dtypes=[np.float32])
    np.testing.assert_allclose(o, np.exp(a), rtol=1e-6)


def test_uint_elem_to_loc_with_negative_strides_is_caught():
    src = """
        uint elem = thread_position_in_grid.x;
        uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
        out[elem] = inp[loc];
    """
    k = msim.metal_kernel("wrap", ["inp"], ["out"], src, ensure_row_contiguous=False)
    a = np.arange(12, dtype=np.float32)[::-1]
    with pytest.raises(msim.KernelError, match="invalid memory access|out-of-bounds"):
        k(inputs=[a], grid=(12, 1, 1), threadgroup=(12, 1, 1), output_shapes=[a.shape], output_dtypes=[np.float32])
