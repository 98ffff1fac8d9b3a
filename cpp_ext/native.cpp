// stemgen CPU hot paths (pybind11, OpenMP). Independent of PyTorch's C++ API: takes contiguous
// numpy buffers whose shapes and dtypes the Python side (stemgen.cpp_ext) has checked.
// bf16 tensors travel as their raw 16-bit patterns (uint16).
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
static inline uint32_t fmix32(uint32_t x) {
    x ^= x >> 16; x *= 0x85EBCA6Bu; x ^= x >> 13; x *= 0xC2B2AE35u; return x ^ (x >> 16);
}
static inline float uniform01(uint32_t key, uint64_t index) {
    uint32_t h = fmix32(static_cast<uint32_t>(index * 0x9E3779B1ull + key));
    h = fmix32(h ^ key);
    return (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

static inline float bf16_to_f32(uint16_t b) { uint32_t u = static_cast<uint32_t>(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// ---------------------------------------------------------------- fused embedding-sum
// tokens [B, C, Q, T] int64, conditions [B, S] int64, tok_table [Q*(V+2), dc], cond_table [rows, dc],
// cond_offsets [S] -> out [B, T, C*dc]; fp32 accumulation.
template <typename Tab, typename Load, typename Store>
static void embed_sum_impl(const i64* tok, const i64* cond, const Tab* table, const Tab* ctable, const i64* coff,
                           Tab* out, i64 B, i64 C, i64 Q, i64 T, i64 S, i64 dc, i64 rows_per_level, i64 cond_rows,
                           Load load, Store store) {
    // validate every id first: a clear error, never a wild read
    for (i64 i = 0; i < B * C * Q * T; ++i)
        if (tok[i] < 0 || tok[i] >= rows_per_level)
            throw py::value_error("token id " + std::to_string(tok[i]) + " out of range [0, " +
                                  std::to_string(rows_per_level) + ") (codes, MASK and NULL)");
    for (i64 b = 0; b < B; ++b)
        for (i64 s = 0; s < S; ++s) {
            i64 r = cond[b * S + s] + coff[s];
            i64 end = (s + 1 < S) ? coff[s + 1] : cond_rows;
            if (cond[b * S + s] < 0 || r >= end)
                throw py::value_error("condition " + std::to_string(s) + " id " + std::to_string(cond[b * S + s]) +
                                      " out of range for its table");
        }
#pragma omp parallel
    {
        std::vector<float> acc(dc), cacc(dc);
#pragma omp for collapse(2) schedule(static)
        for (i64 b = 0; b < B; ++b)
            for (i64 t = 0; t < T; ++t) {
                std::fill(cacc.begin(), cacc.end(), 0.f);
                for (i64 s = 0; s < S; ++s) {
                    const Tab* row = ctable + (cond[b * S + s] + coff[s]) * dc;
                    for (i64 j = 0; j < dc; ++j) cacc[j] += load(row[j]);
                }
                for (i64 c = 0; c < C; ++c) {
                    std::copy(cacc.begin(), cacc.end(), acc.begin());
                    for (i64 q = 0; q < Q; ++q) {
                        const Tab* row = table + (q * rows_per_level + tok[((b * C + c) * Q + q) * T + t]) * dc;
                        for (i64 j = 0; j < dc; ++j) acc[j] += load(row[j]);
                    }
                    Tab* o = out + ((b * T + t) * C + c) * dc;
                    for (i64 j = 0; j < dc; ++j) o[j] = store(acc[j]);
                }
            }
    }
}

template <typename Tab>
static py::array embed_sum(py::array_t<i64, py::array::c_style> tokens, py::array_t<i64, py::array::c_style> conditions,
                           py::array_t<Tab, py::array::c_style> table, py::array_t<Tab, py::array::c_style> ctable,
                           py::array_t<i64, py::array::c_style> coff, bool is_bf16) {
    i64 B = tokens.shape(0), C = tokens.shape(1), Q = tokens.shape(2), T = tokens.shape(3);
    i64 S = conditions.shape(1), dc = table.shape(1);
    py::array_t<Tab> out({B, T, C * dc});
    const i64 rpl = table.shape(0) / Q;
    auto* o = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (is_bf16)
            embed_sum_impl(tokens.data(), conditions.data(), table.data(), ctable.data(), coff.data(), o, B, C, Q, T, S,
                           dc, rpl, ctable.shape(0), [](Tab v) { return bf16_to_f32(static_cast<uint16_t>(v)); },
                           [](float v) { return static_cast<Tab>(f32_to_bf16(v)); });
        else
            embed_sum_impl(tokens.data(), conditions.data(), table.data(), ctable.data(), coff.data(), o, B, C, Q, T, S,
                           dc, rpl, ctable.shape(0), [](Tab v) { return static_cast<float>(v); },
                           [](float v) { return static_cast<Tab>(v); });
    }
    return out;
}

// ---------------------------------------------------------------- fused guidance + sampling + rank score
// exp that GCC vectorises (no libm call): Cephes-style range reduction + degree-6 polynomial,
// within ~2 ulp of expf; exp(-inf) and anything below -87 give 0.
static inline float vexp(float x) {
    const float xc = std::max(x, -87.f);
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
    return x < -87.f ? 0.f : y * scale;
}

static inline float row_max(const float* x, i64 n) {
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (i64 v = 0; v < n; ++v) mx = std::max(mx, x[v]);
    return mx;
}

// logits [R, M, V] fp32, weights [R], positions [M] int64, masked [M] bool -> tokens [M], prob [M], score [M].
// Same maths and the same counter-based noise as kernels.sampling.guide_sample_rank_ref.
static py::tuple guide_sample_rank(py::array_t<float, py::array::c_style> logits,
                                   py::array_t<float, py::array::c_style> weights,
                                   py::array_t<i64, py::array::c_style> positions,
                                   py::array_t<bool, py::array::c_style> masked, i64 length, uint32_t key_sample,
                                   uint32_t key_rank, float temperature, i64 top_k, float top_p, float w_confidence,
                                   float w_causal, float w_random) {
    const i64 R = logits.shape(0), M = logits.shape(1), V = logits.shape(2);
    py::array_t<i64> tokens_out(M);
    py::array_t<float> prob_out(M), score_out(M);
    const float* L = logits.data();
    const float* W = weights.data();
    const i64* P = positions.data();
    const bool* K = masked.data();
    i64* tok = tokens_out.mutable_data();
    float* prob = prob_out.mutable_data();
    float* score = score_out.mutable_data();
    for (i64 m = 0; m < M; ++m)
        if (P[m] < 0 || P[m] >= length) throw py::value_error("position out of range [0, length)");
    const bool filtering = temperature > 0 && ((top_k > 0 && top_k < V) || (top_p > 0 && top_p < 1));
    const float NEG_INF = -std::numeric_limits<float>::infinity();
    {
        py::gil_scoped_release nogil;
#pragma omp parallel
        {
            std::vector<float> g(V), e(V), z;
            std::vector<i64> idx;
            if (filtering) { z.resize(V); idx.resize(V); }
#pragma omp for schedule(static)
            for (i64 m = 0; m < M; ++m) {
                if (!K[m]) { tok[m] = -1; prob[m] = 0.f; score[m] = NEG_INF; continue; }
                float* gp = g.data();
                float* ep = e.data();
#pragma omp simd
                for (i64 v = 0; v < V; ++v) gp[v] = 0.f;
                for (i64 r = 0; r < R; ++r) {  // guided = sum_r w_r * log_softmax(logits_r)
                    const float* l = L + (r * M + m) * V;
                    const float mx = row_max(l, V);
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (i64 v = 0; v < V; ++v) s += vexp(l[v] - mx);
                    const float lse = mx + std::log(s), w = W[r];
#pragma omp simd
                    for (i64 v = 0; v < V; ++v) gp[v] += w * (l[v] - lse);
                }
                const float gmx = row_max(gp, V);
                float gs = 0.f;
#pragma omp simd reduction(+ : gs)
                for (i64 v = 0; v < V; ++v) { ep[v] = vexp(gp[v] - gmx); gs += ep[v]; }
                const float glse = gmx + std::log(gs);
                i64 best = 0;
                if (temperature <= 0) {  // greedy: the first maximum, as argmax
                    for (i64 v = 0; v < V; ++v) if (gp[v] == gmx) { best = v; break; }
                } else {
                    // unnormalised probabilities of the sampled distribution in ep
                    if (filtering) {
                        const float inv_t = 1.f / temperature;
                        for (i64 v = 0; v < V; ++v) z[v] = gp[v] * inv_t;
                        std::iota(idx.begin(), idx.end(), 0);
                        std::stable_sort(idx.begin(), idx.end(), [&](i64 a, i64 b) { return z[a] > z[b]; });
                        i64 keep = V;
                        if (top_k > 0 && top_k < V) {  // ties with the k-th value are kept, as the reference
                            const float kth = z[idx[top_k - 1]];
                            keep = 0;
                            while (keep < V && z[idx[keep]] >= kth) ++keep;
                        }
                        if (top_p > 0 && top_p < 1) {  // smallest prefix whose mass reaches top_p
                            const float zmax = z[idx[0]];
                            float tot = 0.f;
                            for (i64 v = 0; v < V; ++v) tot += vexp(z[v] - zmax);
                            float before = 0.f;
                            i64 n = 0;
                            while (n < keep && before < top_p) { before += vexp(z[idx[n]] - zmax) / tot; ++n; }
                            keep = std::min(keep, std::max<i64>(n, 1));
                        }
                        for (i64 n = keep; n < V; ++n) z[idx[n]] = NEG_INF;
                        const float zmx = z[idx[0]];
                        for (i64 v = 0; v < V; ++v) ep[v] = vexp(z[v] - zmx);
                    } else if (temperature != 1.f) {
                        const float inv_t = 1.f / temperature;
#pragma omp simd
                        for (i64 v = 0; v < V; ++v) ep[v] = vexp((gp[v] - gmx) * inv_t);
                    }
                    double total = 0.0;
                    for (i64 v = 0; v < V; ++v) total += ep[v];
                    const double x = static_cast<double>(uniform01(key_sample, static_cast<uint64_t>(P[m]))) * total;
                    double acc = 0.0;
                    best = V - 1;
                    for (i64 v = 0; v < V; ++v) {  // first code whose running sum exceeds u * total
                        acc += ep[v];
                        if (acc > x) { best = v; break; }
                    }
                }
                tok[m] = best;
                prob[m] = std::exp(gp[best] - glse);
                score[m] = w_confidence * prob[m] + w_causal * (1.f - static_cast<float>(P[m]) / static_cast<float>(length)) +
                           w_random * uniform01(key_rank, static_cast<uint64_t>(P[m]));
            }
        }
    }
    return py::make_tuple(tokens_out, prob_out, score_out);
}

// ---------------------------------------------------------------- RVQ encode
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

static int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// ---------------------------------------------------------------- residual add + RMSNorm, silu(gate) * up
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

PYBIND11_MODULE(_native, m) {
    m.doc() = "stemgen CPU hot paths: fused embedding-sum, guidance + sampling + rank score, RVQ encode, "
              "residual add + RMSNorm, silu * up";
    m.def("embed_sum_f32", &embed_sum<float>);
    m.def("embed_sum_bf16", &embed_sum<uint16_t>);
    m.def("guide_sample_rank", &guide_sample_rank);
    m.def("rvq_encode", &rvq_encode);
    m.def("add_rms_norm_f32", &add_rms_norm<float>);
    m.def("add_rms_norm_bf16", &add_rms_norm<uint16_t>);
    m.def("silu_mul_f32", &silu_mul<float>);
    m.def("silu_mul_bf16", &silu_mul<uint16_t>);
    m.def("num_threads", &num_threads);
    m.def("uniform", [](uint32_t key, uint64_t index) { return uniform01(key, index); });
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
