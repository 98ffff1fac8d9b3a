// The int8 path's two passes around the int8 GEMM (kernels/int8_linear.py): per-row symmetric
// quantization of the activations, and the dequantization of the int32 product with both scales,
// each one pass over its buffer (PyTorch's form takes four and three); the feed-forward's down
// projection takes its input in two int8 parts (quantize_row2).
#include "common.h"

// One row of quantize_rows (below): writes K codes, returns the row's scale.
static inline float quantize_row(const float* xr, i64 K, int8_t* qr) {
    // max |x| on the bit patterns with the sign cleared: for non-negative floats their order is the
    // integers' (inf 0x7f800000, NaN above it), and an integer max reduction vectorises (a float one
    // would need -ffast-math); the row is finite iff that max is below inf's pattern
    uint32_t mbits = 0;
    for (i64 k = 0; k < K; ++k) {
        uint32_t u;
        std::memcpy(&u, xr + k, 4);
        mbits = std::max(mbits, u & 0x7fffffffu);
    }
    const bool finite = mbits < 0x7f800000u;
    float mx;
    std::memcpy(&mx, &mbits, 4);
    float s = mx / 127.0f;
    if (s == 0.f) s = 1.f;
    if (!finite) {  // NaN or inf in the row: codes 0, scale NaN (its outputs NaN), as the reference
        std::fill(qr, qr + K, int8_t{0});
        return std::numeric_limits<float>::quiet_NaN();
    }
    for (i64 k = 0; k < K; ++k)
        qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xr[k] / s))));
    return s;
}

// One row in two int8 parts (the down projection's input on the int8 path, kernels/int8_linear.py):
// q1, s1 as quantize_row, then the residual r = x - q1 * s1 quantized the same way (q2, s2), so
// x ~ q1 * s1 + q2 * s2 with about 14 bits per value where one part keeps 7. A row holding NaN or
// inf: both parts codes 0 and scale NaN. ``r`` is K floats of scratch.
static inline void quantize_row2(const float* xr, i64 K, int8_t* q1, int8_t* q2, float* s1, float* s2, float* r) {
    *s1 = quantize_row(xr, K, q1);
    const float s = *s1;
    for (i64 k = 0; k < K; ++k) r[k] = xr[k] - static_cast<float>(q1[k]) * s;
    *s2 = quantize_row(r, K, q2);
}

// x [N, K] fp32 -> (q int8 [N, K], scale [N]): scale = max|x| / 127 (1 for an all-zero row),
// q = round-half-even(x / scale) clamped to +-127; the reference's float ops in its order. A row
// holding NaN or inf: codes 0 and scale NaN.
static py::tuple quantize_rows(py::array_t<float, py::array::c_style> x) {
    const i64 N = x.shape(0), K = x.shape(1);
    py::array_t<int8_t> q_out({N, K});
    py::array_t<float> s_out(N);
    const float* X = x.data();
    int8_t* Q = q_out.mutable_data();
    float* S = s_out.mutable_data();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
        for (i64 n = 0; n < N; ++n) S[n] = quantize_row(X + n * K, K, Q + n * K);
    }
    return py::make_tuple(q_out, s_out);
}

// x [N, K] fp32 -> (q int8 [2N, K], scale [2N]): row n in two parts (quantize_row2), the first
// parts in rows 0..N-1 and the residual parts in rows N..2N-1, for one int8 GEMM over both.
static py::tuple quantize_rows2(py::array_t<float, py::array::c_style> x) {
    const i64 N = x.shape(0), K = x.shape(1);
    py::array_t<int8_t> q_out({2 * N, K});
    py::array_t<float> s_out(2 * N);
    const float* X = x.data();
    int8_t* Q = q_out.mutable_data();
    float* S = s_out.mutable_data();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel
        {
            std::vector<float> r(K);
#pragma omp for schedule(static)
            for (i64 n = 0; n < N; ++n)
                quantize_row2(X + n * K, K, Q + n * K, Q + (N + n) * K, S + n, S + N + n, r.data());
        }
    }
    return py::make_tuple(q_out, s_out);
}

// The int8 feed-forward's middle, one pass per row: the gate|up product acc [N, 2H] int32
// dequantized (xs [N], ws [2H], as dequantize), silu(gate) * up rounded as silu_mul_f32, and that
// row quantized in two parts for the down projection as quantize_rows2: (q int8 [2N, H], scale
// [2N]). The fp32 gate|up and silu outputs never reach memory.
static py::tuple swiglu_quantize2(py::array_t<int32_t, py::array::c_style> acc,
                                  py::array_t<float, py::array::c_style> xs,
                                  py::array_t<float, py::array::c_style> ws) {
    const i64 N = acc.shape(0), H = acc.shape(1) / 2;
    if (acc.shape(1) != 2 * H || xs.shape(0) != N || ws.shape(0) != 2 * H)
        throw py::value_error("int8 swiglu_quantize2: acc [N, 2H], xs [N], ws [2H] expected");
    py::array_t<int8_t> q_out({2 * N, H});
    py::array_t<float> s_out(2 * N);
    const int32_t* A = acc.data();
    const float *XS = xs.data(), *WS = ws.data();
    int8_t* Q = q_out.mutable_data();
    float* S = s_out.mutable_data();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel
        {
            std::vector<float> row(H), r(H);
#pragma omp for schedule(static)
            for (i64 n = 0; n < N; ++n) {
                const int32_t* a = A + n * 2 * H;
                const float xn = XS[n];
                for (i64 j = 0; j < H; ++j) {
                    const float g = static_cast<float>(a[j]) * xn * WS[j];
                    const float u = static_cast<float>(a[H + j]) * xn * WS[H + j];
                    const float sg = g / (1.f + vexp(-g));
                    row[j] = sg * u;
                }
                quantize_row2(row.data(), H, Q + n * H, Q + (N + n) * H, S + n, S + N + n, r.data());
            }
        }
    }
    return py::make_tuple(q_out, s_out);
}

// acc [P * N, M] int32 (the products of P parts of N rows: quantize_rows for P = 1, quantize_rows2
// for 2), xs [P * N], ws [M] -> (float(acc[n]) * xs[n] (+ float(acc[N + n]) * xs[N + n])) * ws[m],
// left to right as the reference.
static py::array_t<float> dequantize_parts(py::array_t<int32_t, py::array::c_style> acc,
                                           py::array_t<float, py::array::c_style> xs,
                                           py::array_t<float, py::array::c_style> ws, int parts) {
    const i64 N = acc.shape(0) / parts, M = acc.shape(1);
    if (acc.shape(0) != parts * N || xs.shape(0) != parts * N || ws.shape(0) != M)
        throw py::value_error("int8 dequantize: acc [" + std::string(parts == 2 ? "2N" : "N") +
                              ", M], xs [" + (parts == 2 ? "2N" : "N") + "], ws [M] expected");
    py::array_t<float> out({N, M});
    const int32_t* A = acc.data();
    const float *XS = xs.data(), *WS = ws.data();
    float* O = out.mutable_data();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
        for (i64 n = 0; n < N; ++n) {
            const float x1 = XS[n];
            const int32_t* a1 = A + n * M;
            if (parts == 1) {
                for (i64 m = 0; m < M; ++m) O[n * M + m] = static_cast<float>(a1[m]) * x1 * WS[m];
            } else {
                const float x2 = XS[N + n];
                const int32_t* a2 = A + (N + n) * M;
                for (i64 m = 0; m < M; ++m)
                    O[n * M + m] = (static_cast<float>(a1[m]) * x1 + static_cast<float>(a2[m]) * x2) * WS[m];
            }
        }
    }
    return out;
}

void def_int8(py::module_& m) {
    m.def("quantize_rows", &quantize_rows);
    m.def("dequantize", [](py::array_t<int32_t, py::array::c_style> acc, py::array_t<float, py::array::c_style> xs,
                           py::array_t<float, py::array::c_style> ws) { return dequantize_parts(acc, xs, ws, 1); });
    m.def("quantize_rows2", &quantize_rows2);
    m.def("swiglu_quantize2", &swiglu_quantize2);
    m.def("dequantize2", [](py::array_t<int32_t, py::array::c_style> acc, py::array_t<float, py::array::c_style> xs,
                            py::array_t<float, py::array::c_style> ws) { return dequantize_parts(acc, xs, ws, 2); });
}
