"""The GPU step loop must not wait on the device: no op inside a step may need a value back on
the host. Checked on the CPU through the operators a step dispatches (TorchDispatchMode): each op
that forces a host synchronisation on CUDA (reading a scalar, nonzero and boolean-mask indexing,
making a tensor from host data = a blocking host-to-device copy, ...) is recorded. Requests are
admitted (allowed to sync) before the checked steps; the scheduler runs in its GPU form
(head at every frame, no nonzero()). Below: every tensor the step loop and the GPU bench
baseline make names its device."""
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stemgen.engine import Engine, SamplingConfig
from stemgen.engine.backend import Ops, triton_ops
from stemgen.engine.request import Request
from stemgen.engine.runner import StepLoop
from stemgen.train import StemGenConfig

from helpers import make_model_dir

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
           aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.equal.default, aten.is_nonzero.default,
           aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
           aten.repeat_interleave.Tensor, aten.allclose.default}


class SyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self._record(str(func))
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self._record(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def _record(self, what: str):
        self.found.append(f"{what} at {caller()}")


def caller() -> str:
    """The innermost engine line (not a test's) on the stack: folder/file.py:line."""
    frames = [f for f in traceback.extract_stack() if "/tests/" not in f.filename
              and ("/engine/" in f.filename or "/kernels/" in f.filename or "/stemgen/" in f.filename)]
    return f"{'/'.join(frames[-1].filename.rsplit('/', 2)[-2:])}:{frames[-1].lineno}" if frames else "?"


CFG = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=32, ffn_multiple_of=32,
                    instruments=["drums", "bass"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _, d = make_model_dir(tmp_path_factory.mktemp("sync"), CFG)
    eng = Engine.from_pretrained(d, device="cpu", dtype="float32")
    yield eng
    eng.close()


def requests(engine):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (T, guidance, steps) in enumerate([(13, "multi", (3, 2, 2, 1)), (5, "single", (2, 2, 1, 1)),
                                              (8, "none", (4, 1, 1, 1))]):
        ctx = torch.randint(0, CFG.codebook_size, (1, CFG.n_q, T), generator=g)
        out.append(Request(engine.config.lm, ctx, torch.tensor([i % 2]), SamplingConfig(steps=steps, guidance=guidance,
                                                                                   seed=i)))
    return out


def checked_run(sched: StepLoop, reqs) -> list[str]:
    for r in reqs:
        sched.submit(r)
    sched.step()  # admits every request (and builds the per-layout caches): syncing is allowed here
    found = []
    while sched.has_work:
        with SyncDetector() as det:
            sched.step()
        found += det.found
    return found


def test_gpu_form_step_loop_is_sync_free_reference_ops(engine, monkeypatch):
    monkeypatch.setattr(engine.lm, "ops", Ops())
    sched = StepLoop(engine.lm, head_subset=False)
    reqs = requests(engine)
    assert checked_run(sched, reqs) == []
    assert all(r.done for r in reqs)


def test_gpu_form_step_loop_is_sync_free_triton_ops(engine, monkeypatch, tmp_path):
    """The Triton wrappers launch without host reads, too: under the interpreter on a CPU, on
    CUDA tensors where a GPU runs them (the interpreter is off there)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        _, d = make_model_dir(tmp_path, CFG)
        engine = Engine.from_pretrained(d, device="cuda", dtype="float32")
    try:
        monkeypatch.setattr(engine.lm, "ops", triton_ops(torch.float32))
        reqs = requests(engine)
        assert checked_run(StepLoop(engine.lm, head_subset=False), reqs) == []
        assert all(r.done for r in reqs)
    finally:
        if engine.lm.device.type == "cuda":
            engine.close()


def test_detector_sees_syncs(engine):
    """The check can fail: the CPU form (nonzero to find masked frames) and a scalar read are caught."""
    with SyncDetector() as det:
        x = torch.arange(5)
        x[x > 2].sum().item()
    assert any("boolean mask" in f for f in det.found) and any("_local_scalar_dense" in f for f in det.found)
    found = checked_run(StepLoop(engine.lm, head_subset=True), requests(engine))
    assert any("nonzero" in f for f in found)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device; the CPU tests above check the same through the dispatched ops")
def test_cuda_step_loop_has_no_synchronising_call(tmp_path):
    """On a GPU, CUDA's own check: any synchronising call in a step raises."""
    _, d = make_model_dir(tmp_path, CFG)
    eng = Engine.from_pretrained(d, device="cuda")
    try:
        reqs = requests(eng)
        sched = StepLoop(eng.lm)
        for r in reqs:
            sched.submit(r)
        sched.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            while sched.has_work:
                sched.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(r.done for r in reqs)
    finally:
        eng.close()


# --------------------------------------------------------------------------------------------------
# Device-generic code: a tensor made without ``device=`` lands on the CPU, which on a GPU breaks
# (or copies) at the next op. No GPU runs here, so the step loop and the GPU bench baseline are
# checked for factory calls that name no device.

FACTORIES = {torch.tensor, torch.as_tensor, torch.full, torch.zeros, torch.ones, torch.empty, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}


class DevicelessFactories(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and not (
                func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)):
            self.found.append(f"torch.{func.__name__} at {caller()}")
        return func(*args, **kwargs)


def test_step_loop_names_the_device_of_every_new_tensor(engine, monkeypatch):
    monkeypatch.setattr(engine.lm, "ops", Ops())
    sched = StepLoop(engine.lm, head_subset=False)
    reqs = requests(engine)
    for r in reqs:
        sched.submit(r)
    with DevicelessFactories() as det:
        sched.run()   # admission included
    assert det.found == []


def test_bench_baseline_names_the_device_of_every_new_tensor(engine):
    from stemgen.bench import baseline_generate
    from stemgen.train import StemGenLM
    from stemgen.weights_convert.lm import train_state_from_engine
    from safetensors.torch import load_file
    base = StemGenLM(CFG)   # from the model's file: the engine's CPU trunk weights are packed for oneDNN
    base.load_state_dict(train_state_from_engine(CFG, load_file(engine.model_dir / engine.config.weights["lm"])))
    ctx, cond = torch.randint(0, CFG.codebook_size, (2, 1, CFG.n_q, 9)), torch.zeros(2, 1, dtype=torch.long)
    samplings = [SamplingConfig(steps=(2, 1, 1, 1), seed=s) for s in range(2)]
    with DevicelessFactories() as det:
        baseline_generate(base.eval(), engine.config.lm, ctx, cond, samplings)
    assert det.found == []


def test_deviceless_detector_catches_a_factory():
    with DevicelessFactories() as det:
        torch.zeros(3)
        torch.zeros(3, device="cpu")
    assert len(det.found) == 1
