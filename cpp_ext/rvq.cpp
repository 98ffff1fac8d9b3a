// RVQ encode (the codec's engine.codec.rvq_encode_ref).
#include "common.h"

// x [N, D] fp32 (frames), codebooks [K, bins, D] fp32 -> codes [K, N] int64; the residual update
// follows the reference: d = ||r||^2 - 2 r.e + ||e||^2, nearest = argmin d, r -= e[nearest].
static py::array rvq_encode(py::array_t<float, py::array::c_style> x, py::array_t<float, py::array::c_style> books) {
    const i64 N = x.shape(0), D = x.shape(1), K = books.shape(0), bins = books.shape(1);
    py::array_t<i64> codes({K, N});
    const float* X = x.data();
    const float* E = books.data();
    i64* out = codes.mutable_data();
    {
        py::gil_scoped_release nogil;
        std::vector<float> norms(K * bins);
        for (i64 i = 0; i < K * bins; ++i) {
            float s = 0.f;
            for (i64 j = 0; j < D; ++j) s += E[i * D + j] * E[i * D + j];
            norms[i] = s;
        }
#pragma omp parallel
        {
            std::vector<float> r(D);
#pragma omp for schedule(static)
            for (i64 n = 0; n < N; ++n) {
                std::copy(X + n * D, X + (n + 1) * D, r.begin());
                for (i64 k = 0; k < K; ++k) {
                    const float* Ek = E + k * bins * D;
                    float rr = 0.f;
                    for (i64 j = 0; j < D; ++j) rr += r[j] * r[j];
                    float best = std::numeric_limits<float>::infinity();
                    i64 arg = 0;
                    for (i64 b = 0; b < bins; ++b) {
                        const float* e = Ek + b * D;
                        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                        for (i64 j = 0; j < D; ++j) dot += r[j] * e[j];
                        const float d = rr - 2.f * dot + norms[k * bins + b];
                        if (d < best) { best = d; arg = b; }
                    }
                    out[k * N + n] = arg;
                    const float* e = Ek + arg * D;
                    for (i64 j = 0; j < D; ++j) r[j] -= e[j];
                }
            }
        }
    }
    return codes;
}

void def_rvq(py::module_& m) { m.def("rvq_encode", &rvq_encode); }
