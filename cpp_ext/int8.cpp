// The int8 path's two passes around the int8 GEMM (kernels/int8_linear.py): per-row symmetric
// quantization of the activations, and the dequantization of the int32 product with both scales,
// each one pass over its buffer (PyTorch's form takes four and three).
#include "common.h"

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
        for (i64 n = 0; n < N; ++n) {
            const float* xr = X + n * K;
            float mx = 0.f;
            bool finite = true;
            for (i64 k = 0; k < K; ++k) {
                mx = std::max(mx, std::fabs(xr[k]));
                finite &= std::isfinite(xr[k]);
            }
            float s = mx / 127.0f;
            if (s == 0.f) s = 1.f;
            int8_t* qr = Q + n * K;
            if (!finite) {  // NaN or inf in the row: codes 0, scale NaN (its outputs NaN), as the reference
                std::fill(qr, qr + K, int8_t{0});
                S[n] = std::numeric_limits<float>::quiet_NaN();
                continue;
            }
            for (i64 k = 0; k < K; ++k)
                qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xr[k] / s))));
            S[n] = s;
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
}
