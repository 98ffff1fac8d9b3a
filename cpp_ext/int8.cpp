// The int8 path's two passes around the int8 GEMM (kernels/int8_linear.py): per-row symmetric
// quantization of the activations, and the dequantization of the int32 product with both scales,
// each one pass over its buffer (PyTorch's form takes four and three).
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

// The int8 feed-forward's middle, one pass per row: the gate|up product acc [N, 2H] int32
// dequantized (xs [N], ws [2H], as dequantize), silu(gate) * up rounded as silu_mul_f32, and that
// row quantized for the down projection as quantize_rows: (q int8 [N, H], scale [N]). The fp32
// gate|up and silu outputs never reach memory.
static py::tuple swiglu_quantize(py::array_t<int32_t, py::array::c_style> acc,
                                 py::array_t<float, py::array::c_style> xs,
                                 py::array_t<float, py::array::c_style> ws) {
    const i64 N = acc.shape(0), H = acc.shape(1) / 2;
    if (acc.shape(1) != 2 * H || xs.shape(0) != N || ws.shape(0) != 2 * H)
        throw py::value_error("int8 swiglu_quantize: acc [N, 2H], xs [N], ws [2H] expected");
    py::array_t<int8_t> q_out({N, H});
    py::array_t<float> s_out(N);
    const int32_t* A = acc.data();
    const float *XS = xs.data(), *WS = ws.data();
    int8_t* Q = q_out.mutable_data();
    float* S = s_out.mutable_data();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel
        {
            std::vector<float> row(H);
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
                S[n] = quantize_row(row.data(), H, Q + n * H);
            }
        }
    }
    return py::make_tuple(q_out, s_out);
}

// acc [N, M] int32, xs [N], ws [M] -> float(acc) * xs[n] * ws[m] (left to right, as the reference).
static py::array_t<float> dequantize(py::array_t<int32_t, py::array::c_style> acc,
                                     py::array_t<float, py::array::c_style> xs,
                                     py::array_t<float, py::array::c_style> ws) {
    const i64 N = acc.shape(0), M = acc.shape(1);
    if (xs.shape(0) != N || ws.shape(0) != M) throw py::value_error("int8 dequantize: scale sizes do not match");
    py::array_t<float> out({N, M});
    const int32_t* A = acc.data();
    const float *XS = xs.data(), *WS = ws.data();
    float* O = out.mutable_data();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static)
        for (i64 n = 0; n < N; ++n) {
            const float xn = XS[n];
            for (i64 m = 0; m < M; ++m) O[n * M + m] = static_cast<float>(A[n * M + m]) * xn * WS[m];
        }
    }
    return out;
}

void def_int8(py::module_& m) {
    m.def("quantize_rows", &quantize_rows);
    m.def("dequantize", &dequantize);
    m.def("swiglu_quantize", &swiglu_quantize);
}
