// The extension module stemgen.cpp_ext._native: every op's bindings (one source file per op).
#include "common.h"

static int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

PYBIND11_MODULE(_native, m) {
    m.doc() = "stemgen CPU hot paths: fused embedding-sum, guidance + sampling + rank score, RVQ encode, "
              "residual add + RMSNorm, silu * up, MAGNeT guidance + sampling, int8 quantize / dequantize, "
              "RoPE + attention layout";
    def_embedding(m);
    def_sampling(m);
    def_norm(m);
    def_swiglu(m);
    def_rvq(m);
    def_magnet_sampling(m);
    def_int8(m);
    def_rope(m);
    m.def("num_threads", &num_threads);
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
}
