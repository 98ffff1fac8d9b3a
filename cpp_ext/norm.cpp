// Residual add + RMSNorm (kernels/norm.py).
#include "common.h"

// Row-wise, one pass each, with the references' roundings (kernels/norm.py): the sum rounded to the
// model dtype, fp32 statistics, the normalised value rounded before the gain is applied. A row's
// result never depends on the other rows (batch invariance).
template <typename T, typename Load, typename Store>
static void add_rms_norm_impl(const T* x, const T* delta, const T* w, T* xo, T* out, i64 N, i64 D, float eps,
                              Load load, Store store) {
#pragma omp parallel
    {
        std::vector<float> xf(D);
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; ++n) {
            const T* xr = x + n * D;
            if (delta != nullptr) {
                const T* dr = delta + n * D;
                T* xw = xo + n * D;
                for (i64 j = 0; j < D; ++j) {
                    xw[j] = store(load(xr[j]) + load(dr[j]));
                    xf[j] = load(xw[j]);
                }
            } else {
                for (i64 j = 0; j < D; ++j) xf[j] = load(xr[j]);
            }
            // sum of squares in 16 lanes (vectorised; the same fixed order for every row)
            float lanes[16] = {0.f};
            i64 j = 0;
            for (; j + 16 <= D; j += 16)
                for (int l = 0; l < 16; ++l) lanes[l] += xf[j + l] * xf[j + l];
            for (; j < D; ++j) lanes[j % 16] += xf[j] * xf[j];
            float ss = 0.f;
            for (int l = 0; l < 16; ++l) ss += lanes[l];
            const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
            T* o = out + n * D;
            for (i64 j = 0; j < D; ++j) o[j] = store(load(store(xf[j] * r)) * load(w[j]));
        }
    }
}

template <typename T>
static py::tuple add_rms_norm(py::array_t<T, py::array::c_style> x, py::object delta,
                              py::array_t<T, py::array::c_style> w, float eps, bool is_bf16) {
    const i64 N = x.shape(0), D = x.shape(1);
    py::array_t<T> out({N, D});
    py::array_t<T> xo = delta.is_none() ? py::array_t<T>(std::vector<i64>{0}) : py::array_t<T>({N, D});
    py::array_t<T, py::array::c_style> d;
    if (!delta.is_none()) d = delta.cast<py::array_t<T, py::array::c_style>>();
    const T* dp = delta.is_none() ? nullptr : d.data();
    T* xw = delta.is_none() ? nullptr : xo.mutable_data();
    T* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (is_bf16)
            add_rms_norm_impl(x.data(), dp, w.data(), xw, o, N, D, eps,
                              [](T v) { return bf16_to_f32(static_cast<uint16_t>(v)); },
                              [](float v) { return static_cast<T>(f32_to_bf16(v)); });
        else
            add_rms_norm_impl(x.data(), dp, w.data(), xw, o, N, D, eps, [](T v) { return static_cast<float>(v); },
                              [](float v) { return static_cast<T>(v); });
    }
    return py::make_tuple(xo, out);
}

void def_norm(py::module_& m) {
    m.def("add_rms_norm_f32", &add_rms_norm<float>);
    m.def("add_rms_norm_bf16", &add_rms_norm<uint16_t>);
}
