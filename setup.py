"""Builds the optional C++ extension stemgen.cpp_ext._native (pybind11 + OpenMP) during
`pip install`. If it cannot be built, installation still succeeds and the engine runs the
PyTorch ops instead (`stemgen info` says which). STEMGEN_NO_NATIVE=1 skips the build;
STEMGEN_CPU_ARCH sets -march (default: native, since pip builds on the machine that runs it).
-ffp-contract=off: no fused multiply-adds the source does not write, so each op rounds as its
PyTorch reference does (a fused CFG line breaks exact ties differently)."""
import glob
import os

from setuptools import setup

ext_modules = []
if os.environ.get("STEMGEN_NO_NATIVE") != "1":
    from pybind11.setup_helpers import Pybind11Extension

    arch = os.environ.get("STEMGEN_CPU_ARCH", "native")
    ext_modules.append(Pybind11Extension(
        "stemgen.cpp_ext._native", sorted(glob.glob("cpp_ext/*.cpp")), depends=["cpp_ext/common.h"], cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] + ([f"-march={arch}"] if arch else []),
        extra_link_args=["-fopenmp"], optional=True))

setup(ext_modules=ext_modules)
