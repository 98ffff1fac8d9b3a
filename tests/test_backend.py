"""Backend selection from the kernels table: which variant runs per op, device and dtype, what
`stemgen info` says, the self-check and its loud fallback; the engine's forward with the Triton
kernels equals the reference's; the C++ extension is built (and its codec op, RVQ encode)."""
import logging
import os

import pytest
import torch

from stemgen import cpp_ext
from stemgen.engine import backend
from stemgen.engine.api import backends
from stemgen.kernels import OPS
from stemgen.kernels.registry import Op, Variant, register
from stemgen.train import StemGenConfig

from helpers import NEEDS_CPP, backend_missing, load_engine_lm, make_model_dir, random_tokens

# these run the Triton kernels on CPU tensors (the interpreter); on a GPU machine the kernels'
# engine-level checks are test_sync_free / test_parity / test_cuda_graphs on the device
INTERPRETED_TRITON = pytest.mark.skipif(
    backend_missing("triton") is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason=f"needs Triton under TRITON_INTERPRET=1 ({backend_missing('triton') or 'not set'})")


@pytest.mark.skipif(os.environ.get("STEMGEN_NO_NATIVE") == "1",
                    reason="STEMGEN_NO_NATIVE=1: this run has no C++ extension on purpose (bench/gpu_run.sh)")
def test_extension_is_built():
    assert cpp_ext.available(), f"C++ extension {cpp_ext.status()}: pip install -e . needs g++"


@NEEDS_CPP
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_cpu_choice_per_op_and_dtype(dtype):
    """Every op of the table takes its C++ variant where it has one for the dtype, else the reference
    (the norms in C++ for every dtype; the fp32 GEMM op on oneDNN for fp32 only: the int8 path's trunk
    GEMMs are int8); info says so."""
    ops = backend.select_ops(torch.device("cpu"), dtype)
    info = backends(torch.device("cpu"), dtype)
    for op in OPS.values():
        variant = op.variants.get("cpp")
        runs_cpp = variant is not None and variant.why_not(dtype) is None
        assert (getattr(ops, op.name) is not op.reference) == runs_cpp, op.name
        assert info[op.title] == ops.names[op.name]
        assert (info[op.title] == variant.label if variant else False) == runs_cpp
    assert ops.add_rms_norm is not OPS["add_rms_norm"].reference
    assert (ops.linear is not OPS["linear"].reference) == (dtype == torch.float32)


@NEEDS_CPP
def test_fp32_and_int8_models_run_their_cpp_ops(tmp_path):
    """fp32 and --dtype int8 both take the C++ norms; fp32's trunk weights are packed for oneDNN's GEMM,
    int8's are int8 (the fp32 GEMM op declined there)."""
    from stemgen.engine.model import Int8Weight, PackedWeight
    cfg = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=16, ffn_multiple_of=16)
    _, d = make_model_dir(tmp_path, cfg)
    fp32, int8 = load_engine_lm(d), load_engine_lm(d, dtype="int8")
    for lm in (fp32, int8):
        assert lm.ops.add_rms_norm is not OPS["add_rms_norm"].reference
        assert lm.ops.names["rms_norm"] == OPS["rms_norm"].variants["cpp"].label
    assert fp32.ops.linear is not OPS["linear"].reference and int8.ops.linear is OPS["linear"].reference
    assert all(isinstance(getattr(layer, n), PackedWeight) for layer in fp32.layers for n in fp32.TRUNK_WEIGHTS)
    assert all(isinstance(getattr(layer, n), Int8Weight) for layer in int8.layers for n in int8.TRUNK_WEIGHTS)


@NEEDS_CPP
def test_a_registered_op_reaches_ops_and_info():
    """Adding an op is one registration: Ops, the selection and `stemgen info` follow the table."""
    def twice_ref(x):
        return 2 * x

    try:
        register(Op("twice", "twice (test op)", twice_ref),
                 Variant("cpp", "stemgen.engine.backend:Ops", "C++ (not really)", dtypes=(torch.bfloat16,)))
        assert backend.Ops().twice is twice_ref
        fp32, bf16 = (backend.select_ops(torch.device("cpu"), d) for d in (torch.float32, torch.bfloat16))
        assert fp32.twice is twice_ref and "takes bfloat16, not float32" in fp32.names["twice"]
        assert bf16.twice is backend.Ops and bf16.names["twice"] == "C++ (not really)"
        assert backends(torch.device("cpu"), torch.float32)["twice (test op)"] == fp32.names["twice"]
        with pytest.raises(TypeError, match="unknown ops: nope"):
            backend.Ops(nope=twice_ref)
    finally:
        OPS.pop("twice", None)


def test_reference_forced(monkeypatch):
    monkeypatch.setenv("STEMGEN_BACKEND", "reference")
    ops = backend.select_ops(torch.device("cpu"), torch.bfloat16)
    assert all(getattr(ops, op.name) is op.reference for op in OPS.values())
    monkeypatch.setenv("STEMGEN_BACKEND", "fast")
    with pytest.raises(ValueError, match="use auto, reference, cpp or triton"):
        backend.select_ops(torch.device("cpu"), torch.float32)


@INTERPRETED_TRITON
def test_engine_forward_with_triton_kernels_equals_reference(tmp_path):
    cfg = StemGenConfig(d_model=48, n_heads=2, n_layers=2, codebook_size=40, ffn_multiple_of=16, n_channels=2)
    _, d = make_model_dir(tmp_path, cfg)
    ref_lm, tri_lm = load_engine_lm(d), load_engine_lm(d)
    ref_lm.ops, tri_lm.ops = backend.Ops(), backend.triton_ops(torch.float32)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for R, T, level in [(3, 11, 0), (1, 4, 2)]:
        tokens, conds = random_tokens(cfg, R, T, gen)
        reqs.append((tokens, conds, level, None))
    for want, got in zip(ref_lm.forward_requests(reqs), tri_lm.forward_requests(reqs)):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@INTERPRETED_TRITON
def test_selfcheck_passes_and_a_failing_kernel_falls_back_loudly(monkeypatch, caplog):
    """The engine self-checks the Triton kernels once per device; a kernel that fails to compile or
    disagrees is reported (log + `stemgen info` names) and the reference ops run instead, unless
    STEMGEN_BACKEND=triton demanded Triton (then a clear error)."""
    from stemgen.kernels import attention_triton
    from stemgen.kernels.attention import attention_ref

    cpu = torch.device("cpu")
    backend._selfcheck.clear()
    assert backend.triton_selfcheck(cpu, torch.float32) is None
    monkeypatch.setenv("STEMGEN_BACKEND", "triton")
    assert backend.select_ops(cpu, torch.float32).attention is attention_triton.attention

    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed")

    backend._selfcheck.clear()
    monkeypatch.setattr(attention_triton, "attention", broken)
    with pytest.raises(RuntimeError, match="self-check: RuntimeError: PTX compilation failed"):
        backend.select_ops(cpu, torch.float32)
    backend._selfcheck.clear()
    backend._warned.clear()   # the fallback is reported once per cause: make this one the first
    if not torch.cuda.is_available():  # auto on a "cuda" device that cannot run: loud fallback
        monkeypatch.setenv("STEMGEN_BACKEND", "auto")
        monkeypatch.setattr(logging.getLogger("stemgen"), "propagate", True)  # the CLI tests route it to stderr
        with caplog.at_level("WARNING", logger="stemgen"):
            ops = backend.select_ops(torch.device("cuda"), torch.float32)
        assert ops.attention is attention_ref and "self-check" in ops.names["attention"]
        assert any("self-check" in r.getMessage() for r in caplog.records)
    backend._selfcheck.clear()


@NEEDS_CPP
@pytest.mark.parametrize("N,D,K,bins", [(1, 8, 1, 16), (250, 128, 4, 2048), (37, 20, 3, 100)])
def test_cpp_rvq_encode_matches_reference(N, D, K, bins):
    """The codec's RVQ encode in C++ (benchmarked against the GEMM reference; the codec uses the
    reference, which is faster here: see `stemgen info`)."""
    from stemgen.engine.codec import rvq_encode_ref

    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, D, generator=g)
    books = torch.randn(K, bins, D, generator=g) * (0.6 ** torch.arange(K))[:, None, None]
    assert (cpp_ext.rvq_encode(x, books) == rvq_encode_ref(x, books)).float().mean() >= 0.999
