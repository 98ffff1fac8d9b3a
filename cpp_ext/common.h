// stemgen CPU hot paths (pybind11, OpenMP), one source file per op (embedding.cpp, sampling.cpp,
// norm.cpp, swiglu.cpp, rvq.cpp, magnet_sampling.cpp, int8.cpp, rope.cpp) and module.cpp binding them;
// the shared pieces are here.
// Independent of PyTorch's C++ API: the ops take contiguous numpy buffers whose shapes and dtypes
// the Python side (stemgen.cpp_ext) has checked. bf16 tensors travel as their raw 16-bit patterns.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using i64 = int64_t;

// ---------------------------------------------------------------- counter-based RNG (kernels/rng.py)
inline uint32_t fmix32(uint32_t x) {
    x ^= x >> 16; x *= 0x85EBCA6Bu; x ^= x >> 13; x *= 0xC2B2AE35u; return x ^ (x >> 16);
}
inline float uniform01(uint32_t key, uint64_t index) {
    uint32_t h = fmix32(static_cast<uint32_t>(index * 0x9E3779B1ull + key));
    h = fmix32(h ^ key);
    return (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

inline float bf16_to_f32(uint16_t b) { uint32_t u = static_cast<uint32_t>(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// exp that GCC vectorises (no libm call): Cephes-style range reduction + degree-6 polynomial,
// within ~2 ulp of expf; exp(-inf) and anything below -87 give 0, anything above 88.72 (where expf
// overflows) +inf. The reduction runs on x clamped to [-87, 88], so the exponent bits never overflow.
inline float vexp(float x) {
    const float xc = std::min(std::max(x, -87.f), 88.f);
    const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
    const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return x < -87.f ? 0.f : (x > 88.72f ? std::numeric_limits<float>::infinity() : y * scale);
}

// each op's file defines its bindings
void def_embedding(py::module_& m);
void def_sampling(py::module_& m);
void def_norm(py::module_& m);
void def_swiglu(py::module_& m);
void def_rvq(py::module_& m);
void def_magnet_sampling(py::module_& m);
void def_int8(py::module_& m);
void def_rope(py::module_& m);
