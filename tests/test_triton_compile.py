"""Every Triton kernel compiles for Hopper (sm_90) here, without a GPU (Triton's ahead-of-time
compiler and bundled ptxas; tests/compile_sm90.py, run in a subprocess since the test session runs
Triton in interpreter mode): no register spills, shared memory within a block's 227 KB,
attention's dots on wgmma (and its tensor-descriptor configurations on TMA), 16-byte loads in the
memory-bound kernels. The interpreter tests check the arithmetic; this checks that the same
source lowers to real GPU code at StemGen's shapes. Not a speed figure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                                reason=f"this Triton has no bundled CUDA tools ({BIN})")


def compile_all(*args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_sm90.py"), "--json", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90_without_spills():
    """... and the check itself sees spills: a flash tile too large for the register file, compiled
    in the same process, must report them."""
    *results, probe = compile_all("--with-probe")
    assert probe["name"].endswith("(spill probe)") and probe["spill_bytes"] > 0
    import importlib.util
    spec = importlib.util.spec_from_file_location("compile_sm90", ROOT / "tests" / "compile_sm90.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    assert sorted(r["name"] for r in results) == sorted(v.name for v in mod.variants())  # every variant compiled
    for r in results:
        assert r["spill_bytes"] == 0, f"{r['name']}: {r['spill_bytes']} bytes of local memory per thread (spills)"
        assert r["shared_bytes"] <= 227 * 1024 and r["registers"] <= 255, r
        assert r["wgmma"] or not r["wgmma_expected"], f"{r['name']}: no HGMMA in the SASS (not on wgmma)"
        assert r["wide_loads"] or not r["wide_expected"], f"{r['name']}: no 16-byte global loads (LDG.E.128)"
        assert r["tma"] or not r["tma_expected"], f"{r['name']}: no TMA loads (UTMALDG) in the SASS"
