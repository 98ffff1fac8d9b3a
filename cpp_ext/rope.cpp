// The attention's RoPE (kernels/attention.py, rope_ref) and its layout change in one pass: the
// fused projection's rows qkv [N, 3, H, dh] -> q, k, v each [N * H * dh], a sequence group of R rows
// x T frames stored as [R, H, T, dh] (the layout scaled_dot_product_attention reads contiguously);
// q and k rotated (rotate-half, fp32 maths in the reference's order, rounded to the dtype), v copied.
#include "common.h"

template <typename T, typename Load, typename Store>
static void rope_pack_impl(const T* qkv, const float* cs, const float* sn, const i64* segs, i64 S, i64 H, i64 dh,
                           T* q_out, T* k_out, T* v_out, Load load, Store store) {
    const i64 half = dh / 2, hd = H * dh;
    i64 start = 0;  // the group's first row
    for (i64 s = 0; s < S; ++s) {
        const i64 R = segs[2 * s], Tn = segs[2 * s + 1];
#pragma omp parallel for collapse(2) schedule(static)
        for (i64 r = 0; r < R; ++r)
            for (i64 t = 0; t < Tn; ++t) {
                const T* row = qkv + (start + r * Tn + t) * 3 * hd;
                const float* c = cs + t * half;
                const float* si = sn + t * half;
                for (i64 h = 0; h < H; ++h) {
                    const i64 o = start * hd + ((r * H + h) * Tn + t) * dh;
                    const T* xq = row + h * dh;
                    const T* xk = row + hd + h * dh;
                    const T* xv = row + 2 * hd + h * dh;
                    for (i64 j = 0; j < half; ++j) {
                        const float q1 = load(xq[j]), q2 = load(xq[half + j]);
                        const float k1 = load(xk[j]), k2 = load(xk[half + j]);
                        q_out[o + j] = store(q1 * c[j] - q2 * si[j]);
                        q_out[o + half + j] = store(q2 * c[j] + q1 * si[j]);
                        k_out[o + j] = store(k1 * c[j] - k2 * si[j]);
                        k_out[o + half + j] = store(k2 * c[j] + k1 * si[j]);
                    }
                    std::memcpy(v_out + o, xv, dh * sizeof(T));
                }
            }
        start += R * Tn;
    }
}

// qkv [N, 3 * H * dh], cos / sin [T_max, dh / 2] fp32, segments [S, 2] int64 (rows, frames).
template <typename T>
static py::tuple rope_pack(py::array_t<T, py::array::c_style> qkv, py::array_t<float, py::array::c_style> cs,
                           py::array_t<float, py::array::c_style> sn, py::array_t<i64, py::array::c_style> segs,
                           i64 H, bool is_bf16) {
    const i64 N = qkv.shape(0), S = segs.shape(0), half = cs.shape(1), dh = 2 * half;
    if (qkv.shape(1) != 3 * H * dh || sn.shape(0) != cs.shape(0) || sn.shape(1) != half || segs.shape(1) != 2)
        throw py::value_error("rope_pack: qkv [N, 3 H dh], cos / sin [T, dh/2], segments [S, 2] expected");
    const i64* sg = segs.data();
    i64 rows = 0;
    for (i64 s = 0; s < S; ++s) {
        if (sg[2 * s] < 0 || sg[2 * s + 1] < 0 || sg[2 * s + 1] > cs.shape(0))
            throw py::value_error("rope_pack: a segment's frames exceed the cos / sin table");
        if (sg[2 * s] > N) throw py::value_error("rope_pack: the segments do not cover the rows");
        rows += sg[2 * s] * sg[2 * s + 1];   // R <= N and T <= the table: no overflow
        if (rows > N) throw py::value_error("rope_pack: the segments do not cover the rows");
    }
    if (rows != N) throw py::value_error("rope_pack: the segments do not cover the rows");
    py::array_t<T> q({N * H * dh}), k({N * H * dh}), v({N * H * dh});
    {
        py::gil_scoped_release nogil;
        if (is_bf16)
            rope_pack_impl(qkv.data(), cs.data(), sn.data(), sg, S, H, dh, q.mutable_data(), k.mutable_data(),
                           v.mutable_data(), [](T x) { return bf16_to_f32(static_cast<uint16_t>(x)); },
                           [](float x) { return static_cast<T>(f32_to_bf16(x)); });
        else
            rope_pack_impl(qkv.data(), cs.data(), sn.data(), sg, S, H, dh, q.mutable_data(), k.mutable_data(),
                           v.mutable_data(), [](T x) { return static_cast<float>(x); },
                           [](float x) { return static_cast<T>(x); });
    }
    return py::make_tuple(q, k, v);
}

void def_rope(py::module_& m) {
    m.def("rope_pack_f32", &rope_pack<float>);
    m.def("rope_pack_bf16", &rope_pack<uint16_t>);
}
