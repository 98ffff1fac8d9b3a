// silu(gate) * up (kernels/swiglu.py), with the reference's rounding of the silu output.
#include "common.h"

template <typename T, typename Load, typename Store>
static void silu_mul_impl(const T* gu, T* out, i64 N, i64 H, Load load, Store store) {
#pragma omp parallel for schedule(static)
    for (i64 n = 0; n < N; ++n) {
        const T* g = gu + n * 2 * H;
        const T* u = g + H;
        T* o = out + n * H;
        for (i64 j = 0; j < H; ++j) {
            const float gv = load(g[j]);
            o[j] = store(load(store(gv / (1.f + vexp(-gv)))) * load(u[j]));
        }
    }
}

template <typename T>
static py::array silu_mul(py::array_t<T, py::array::c_style> gu, bool is_bf16) {
    const i64 N = gu.shape(0), H = gu.shape(1) / 2;
    py::array_t<T> out({N, H});
    T* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (is_bf16)
            silu_mul_impl(gu.data(), o, N, H, [](T v) { return bf16_to_f32(static_cast<uint16_t>(v)); },
                          [](float v) { return static_cast<T>(f32_to_bf16(v)); });
        else
            silu_mul_impl(gu.data(), o, N, H, [](T v) { return static_cast<float>(v); },
                          [](float v) { return static_cast<T>(v); });
    }
    return out;
}

void def_swiglu(py::module_& m) {
    m.def("silu_mul_f32", &silu_mul<float>);
    m.def("silu_mul_bf16", &silu_mul<uint16_t>);
}
