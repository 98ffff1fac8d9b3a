// Fused embedding-sum (kernels/embedding.py).
#include "common.h"

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

void def_embedding(py::module_& m) {
    m.def("embed_sum_f32", &embed_sum<float>);
    m.def("embed_sum_bf16", &embed_sum<uint16_t>);
}
