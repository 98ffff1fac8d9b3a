"""CUDA graphs for the trunk (engine.graphs). The bookkeeping (one graph per batch layout, recorded
on a layout's second step, new tokens copied into the static inputs, eviction) is checked on the
CPU with an eager stand-in for the CUDA graph: it re-runs the recorded function on the static
inputs, so a step that forgot to copy its tokens in would produce other tokens. The real graphs
are checked on a GPU only."""
import pytest
import torch

from stemgen.engine import Engine, SamplingConfig
from stemgen.engine.api import use_cuda_graphs
from stemgen.engine.graphs import CudaGraphBackend, TrunkGraphs
from stemgen.engine.request import Request
from stemgen.engine.runner import Runner, StepLoop
from stemgen.train import StemGenConfig

from helpers import make_model_dir

CFG = StemGenConfig(d_model=32, n_heads=2, n_layers=2, codebook_size=32, ffn_multiple_of=32,
                    instruments=["drums", "bass"])


class EagerStandIn(CudaGraphBackend):
    def new_graph(self):
        return {}

    def record(self, graph, fn):
        graph["fn"] = fn
        graph["out"] = fn()
        return graph["out"]

    def replay(self, graph):
        graph["out"].copy_(graph["fn"]())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("graphs"), CFG)[1]


def make_requests(lm, n=4):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        T = [30, 12, 45, 7][i % 4]
        ctx = torch.randint(0, CFG.codebook_size, (1, CFG.n_q, T), generator=g)
        out.append(Request(lm.cfg, ctx, torch.tensor([i % 2]), SamplingConfig(steps=(5, 3, 2, 2), seed=i,
                                                                              guidance=["multi", "single"][i % 2])))
    return out


def run(lm, reqs, join_every=0, graphs=None):
    """Run with requests joining one by one every ``join_every`` steps (0: all at once)."""
    sched = StepLoop(Runner(lm, head_subset=False, graphs=graphs))
    pending = list(reqs)
    step = 0
    while pending or sched.has_work:
        if pending and (join_every == 0 or step % join_every == 0):
            for r in (pending if join_every == 0 else pending[:1]):
                sched.submit(r)
            pending = [] if join_every == 0 else pending[1:]
        sched.step()
        step += 1
    return [r.tokens for r in reqs]


@pytest.mark.parametrize("join_every,max_graphs", [(0, 8), (3, 8), (3, 1)])
def test_graph_bookkeeping_gives_the_eager_tokens(model_dir, join_every, max_graphs):
    eng = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    try:
        lm = eng.lm
        want = run(lm, make_requests(lm), join_every)
        graphs = TrunkGraphs(lm, max_graphs=max_graphs, backend=EagerStandIn())
        got = run(lm, make_requests(lm), join_every, graphs)
        assert graphs.recorded >= 1 and graphs.replays > 0
        assert len(graphs.graphs) <= max_graphs
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    finally:
        eng.close()


def test_stale_inputs_would_be_caught(model_dir):
    """The stand-in really reads the static inputs: skipping the copy changes the tokens."""
    eng = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    try:
        lm = eng.lm
        want = run(lm, make_requests(lm, 1))

        class NoCopy(TrunkGraphs):
            def hidden(self, pairs):
                g = self.graphs.get(self.layout(pairs))
                if g is not None:
                    self.backend.replay(g.graph)
                    return g.output
                return super().hidden(pairs)

        got = run(lm, make_requests(lm, 1), graphs=NoCopy(lm, backend=EagerStandIn()))
        assert not torch.equal(want[0], got[0])
    finally:
        eng.close()


def test_cuda_graphs_need_cuda(model_dir, monkeypatch):
    eng = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    try:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            use_cuda_graphs(eng.lm, True)
        monkeypatch.setenv("STEMGEN_CUDA_GRAPHS", "1")   # the variable alone leaves the CPU eager
        assert use_cuda_graphs(eng.lm, None) is None
        monkeypatch.setenv("STEMGEN_CUDA_GRAPHS", "yes")
        with pytest.raises(ValueError, match="STEMGEN_CUDA_GRAPHS"):
            use_cuda_graphs(eng.lm, None)
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("join_every", [0, 3])
def test_cuda_graphs_equal_eager_on_gpu(model_dir, join_every):
    eng = Engine.from_pretrained(model_dir, device="cuda")
    try:
        lm = eng.lm
        want = run(lm, make_requests(lm), join_every)
        graphs = use_cuda_graphs(lm, True)
        got = run(lm, make_requests(lm), join_every, graphs)
        assert graphs.recorded >= 1 and graphs.replays > 0
        same = sum(int((a == b).sum()) for a, b in zip(want, got)) / sum(a.numel() for a in want)
        assert same == 1.0, same
    finally:
        eng.close()


def test_a_failed_recording_runs_eagerly_and_says_so(model_dir, caplog):
    """A capture CUDA refuses (here: the stand-in raises) leaves the tokens right: the trunk runs
    eagerly from then on, and the engine logs why once."""
    class Refusing(EagerStandIn):
        def record(self, graph, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    eng = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    try:
        lm = eng.lm
        want = run(lm, make_requests(lm), 3)
        graphs = TrunkGraphs(lm, backend=Refusing())
        with caplog.at_level("WARNING", logger="stemgen"):
            got = run(lm, make_requests(lm), 3, graphs)
        assert graphs.failed == "operation not permitted when stream is capturing" and graphs.replays == 0
        assert [r.message for r in caplog.records].count(
            "CUDA graph recording failed (operation not permitted when stream is capturing); "
            "the trunk runs eagerly from now on") == 1
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    finally:
        eng.close()


def test_replays_hand_out_copies_and_the_service_records_its_own(model_dir):
    """Callers in several threads never share a graph's output buffer; the background service
    (codec work on other threads meanwhile) has no graphs unless they were asked for explicitly,
    and then its own."""
    eng = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    try:
        lm = eng.lm
        graphs = TrunkGraphs(lm, backend=EagerStandIn())
        reqs = make_requests(lm, 1)
        pairs = [(torch.randint(0, CFG.codebook_size, (3, 2, CFG.n_q, 9)), torch.zeros(3, 1, dtype=torch.long))]
        graphs.hidden(pairs)
        graphs.hidden(pairs)                 # recorded on the layout's second step
        out = graphs.hidden(pairs)           # replayed
        (g,) = graphs.graphs.values()
        assert graphs.replays == 2 and out is not g.output and torch.equal(out, g.output)
        assert out.data_ptr() != g.output.data_ptr()
        for explicit in (False, True):
            e = Engine(eng.config, lm, graphs=TrunkGraphs(lm, backend=EagerStandIn()), service_graphs=explicit)
            try:
                sg = e.service.loop.runner.graphs
                assert (sg is not None) == explicit and sg is not e.runner.graphs
                h = e.submit(reqs[0].context, 0, sampling=SamplingConfig(steps=(2, 1, 1, 1)))
                assert h.result(timeout=60).shape == (CFG.n_q, reqs[0].context.shape[-1])
            finally:
                e.close()
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_service_graphs_beside_other_threads_cuda_work_on_gpu(model_dir):
    """On a GPU: the service recording and replaying graphs (asked for explicitly) while another
    thread allocates and computes on the device, as the codec does for other requests: the same
    tokens as an eager engine, and no recording refused."""
    import threading

    eager = Engine.from_pretrained(model_dir, device="cuda", cuda_graphs=False)
    eng = Engine.from_pretrained(model_dir, device="cuda", cuda_graphs=True)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            x = torch.randn(512, 512, device="cuda")
            (x @ x).sum().item()

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()
    try:
        reqs = make_requests(eng.lm, 8)
        want = [eager.submit(r.context, r.conditions[0].item(), sampling=r.sampling) for r in reqs]
        want = [h.result(timeout=120) for h in want]
        got = [eng.submit(r.context, r.conditions[0].item(), sampling=r.sampling) for r in reqs]
        got = [h.result(timeout=120) for h in got]
        graphs = eng.service.loop.runner.graphs
        assert graphs is not None and graphs.failed is None and graphs.recorded >= 1, graphs.failed
        same = sum(int((a == b).sum()) for a, b in zip(want, got)) / sum(a.numel() for a in want)
        assert same == 1.0, same
    finally:
        stop.set()
        worker.join()
        eager.close()
        eng.close()
