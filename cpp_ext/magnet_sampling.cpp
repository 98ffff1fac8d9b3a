// MAGNeT guidance + sampling (kernels/magnet_sampling.py): annealed CFG on logits, tempered softmax,
// top-p nucleus (sorted, audiocraft's sample_top_p) or top-k, inverse-CDF draw with the counter-based
// uniform, and the confidence (the sampled token's probability before truncation).
#include "common.h"

// logits [R, M, V] fp32 (R = 2: conditioned, unconditioned; or 1), positions [M] -> tokens [M], prob [M].
static py::tuple magnet_sample(py::array_t<float, py::array::c_style> logits,
                               py::array_t<i64, py::array::c_style> positions, uint32_t key, float coef,
                               float temperature, i64 top_k, float top_p) {
    const i64 R = logits.shape(0), M = logits.shape(1), V = logits.shape(2);
    if (R != 1 && R != 2) throw py::value_error("magnet_sample: logits need 1 or 2 rows");
    if (!(temperature > 0)) throw py::value_error("magnet_sample: temperature must be > 0");
    py::array_t<i64> tokens_out(M);
    py::array_t<float> prob_out(M);
    const float* L = logits.data();
    const i64* P = positions.data();
    i64* tok = tokens_out.mutable_data();
    float* prob = prob_out.mutable_data();
    const bool nucleus = top_p > 0, topk = !nucleus && top_k > 0 && top_k < V;
    {
        py::gil_scoped_release nogil;
#pragma omp parallel
        {
            std::vector<float> p(V), q;
            std::vector<i64> idx;
            if (nucleus || topk) { q.resize(V); idx.resize(V); }
#pragma omp for schedule(static)
            for (i64 m = 0; m < M; ++m) {
                const float* c = L + m * V;
                const float* u = R == 2 ? L + (M + m) * V : c;
                float* pp = p.data();
                float mx = -std::numeric_limits<float>::infinity();
                for (i64 v = 0; v < V; ++v) {  // guided / temperature, as the reference's two float ops
                    const float g = R == 2 ? u[v] + (c[v] - u[v]) * coef : c[v];
                    pp[v] = g / temperature;
                    mx = std::max(mx, pp[v]);
                }
                float s = 0.f;
                for (i64 v = 0; v < V; ++v) { pp[v] = std::exp(pp[v] - mx); s += pp[v]; }
                if (std::isnan(s)) {  // a NaN or infinite logit: the reference's order puts code 0 first
                    tok[m] = 0;
                    prob[m] = std::numeric_limits<float>::quiet_NaN();
                    continue;
                }
                for (i64 v = 0; v < V; ++v) pp[v] /= s;
                const double x = static_cast<double>(uniform01(key, static_cast<uint64_t>(P[m])));
                i64 best = V - 1;
                if (nucleus) {  // sorted descending; drop where the mass before a code exceeds top_p
                    std::iota(idx.begin(), idx.end(), 0);
                    std::stable_sort(idx.begin(), idx.end(), [&](i64 a, i64 b) { return pp[a] > pp[b]; });
                    double cum = 0.0;  // torch's CPU cumsum: fp64 running sum, each prefix rounded to fp32
                    float kept = 0.f;
                    for (i64 n = 0; n < V; ++n) {
                        const float pn = pp[idx[n]];
                        cum += pn;
                        q[n] = (static_cast<float>(cum) - pn > top_p) ? 0.f : pn;
                        kept += q[n];
                    }
                    double total = 0.0;
                    for (i64 n = 0; n < V; ++n) { q[n] /= kept; total += q[n]; }
                    double acc = 0.0;
                    for (i64 n = 0; n < V; ++n) {
                        acc += q[n];
                        if (acc > x * total) { best = idx[n]; break; }
                        if (n == V - 1) best = idx[n];
                    }
                } else {
                    const float* w = pp;
                    if (topk) {  // the k-th largest probability; ties with it kept, as the reference
                        std::copy(pp, pp + V, q.begin());
                        std::nth_element(q.begin(), q.begin() + (top_k - 1), q.end(), std::greater<float>());
                        const float kth = q[top_k - 1];
                        float kept = 0.f;
                        for (i64 v = 0; v < V; ++v) { q[v] = pp[v] >= kth ? pp[v] : 0.f; kept += q[v]; }
                        for (i64 v = 0; v < V; ++v) q[v] /= kept;
                        w = q.data();
                    }
                    double total = 0.0;
                    for (i64 v = 0; v < V; ++v) total += w[v];
                    double acc = 0.0;
                    for (i64 v = 0; v < V; ++v) {
                        acc += w[v];
                        if (acc > x * total) { best = v; break; }
                    }
                }
                tok[m] = best;
                prob[m] = pp[best];
            }
        }
    }
    return py::make_tuple(tokens_out, prob_out);
}

void def_magnet_sampling(py::module_& m) { m.def("magnet_sample", &magnet_sample); }
