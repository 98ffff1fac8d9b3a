// Fused guidance + sampling + rank score (kernels/sampling.py).
#include "common.h"

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
                        if (top_p > 0 && top_p < 1) {  // smallest prefix whose mass (after top-k) reaches top_p
                            const float zmax = z[idx[0]];
                            float tot = 0.f;
                            for (i64 n = 0; n < keep; ++n) tot += vexp(z[idx[n]] - zmax);
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

void def_sampling(py::module_& m) {
    m.def("guide_sample_rank", &guide_sample_rank);
    m.def("uniform", [](uint32_t key, uint64_t index) { return uniform01(key, index); });
}
