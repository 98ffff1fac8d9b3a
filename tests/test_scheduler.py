"""Batched scheduler: batch invariance, continuous batching, threads, cancellation, per-request errors."""
import threading
from concurrent.futures import CancelledError

import pytest

from stemgen.engine.errors import RequestError
import torch

from stemgen.engine import Engine, SamplingConfig
from stemgen.engine.request import Request
from stemgen.engine.runner import Runner, StepLoop, chunks
from stemgen.train import StemGenConfig

from helpers import make_model_dir

CFG = StemGenConfig(d_model=64, n_heads=4, n_layers=2, codebook_size=64, ffn_multiple_of=32,
                    instruments=["drums", "bass", "guitar", "keys"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _, d = make_model_dir(tmp_path_factory.mktemp("sched"), CFG)
    eng = Engine.from_pretrained(d, device="cpu", dtype="float32")
    yield eng
    eng.close()


def context(T, seed):
    return torch.randint(0, CFG.codebook_size, (1, CFG.n_q, T), generator=torch.Generator().manual_seed(seed))


def variety(i):
    """Requests that differ in duration, instrument, guidance, steps and seed."""
    return dict(T=[40, 95, 17, 130, 64, 1, 77, 200][i % 8], instrument=i % 4,
                sampling=SamplingConfig(steps=[(6, 4, 2, 2), (3, 3, 3, 3), (8, 2, 1, 1)][i % 3],
                                        guidance=["multi", "single", "none"][i % 3], seed=100 + i,
                                        temperature=[1.0, 0.8][i % 2], top_k=[0, 20][i % 2]))


def make_request(engine, i, target=None):
    v = variety(i)
    return Request(engine.config.lm, context(v["T"], i), torch.tensor([v["instrument"]]), v["sampling"],
                   target=target)


def test_batch_invariance_with_requests_joining(engine):
    """A request's tokens alone == among 7 other different requests that join at different steps
    (CPU fp32: bit-exact; GEMMs are kept in one kernel regime and attention is per request)."""
    alone = StepLoop(engine.lm)
    probe = make_request(engine, 0)
    alone.submit(probe)
    alone.run()

    sched = StepLoop(engine.lm)
    mine = make_request(engine, 0)
    sched.submit(mine)
    others = [make_request(engine, i) for i in range(1, 8)]
    step, finished = 0, []
    while sched.has_work:
        if step < len(others) * 2 and step % 2 == 0:
            sched.submit(others[step // 2])   # joins mid-flight, at another level/step
        finished += sched.step()
        step += 1
        if step == 3:
            assert len(sched.running) >= 2, "requests run together"
    assert torch.equal(mine.tokens, probe.tokens)
    assert len(finished) == 8 and all(r.done for r in finished)
    for i, r in enumerate(others, start=1):   # and each companion equals its own solo run
        solo = StepLoop(engine.lm)
        ref = make_request(engine, i)
        solo.submit(ref)
        solo.run()
        assert torch.equal(r.tokens, ref.tokens), i


def test_cpu_chunks_group_whole_requests_in_order():
    assert chunks([300, 300, 900, 100, 2000], 1000) == [[0, 1], [2, 3], [4]]
    assert chunks([300, 300, 900], 0) == [[0, 1, 2]]


@pytest.mark.parametrize("chunk_rows", [0, 300, 10 ** 6])
def test_chunked_forwards_give_the_same_tokens(engine, chunk_rows):
    """The CPU runs a large batch in chunks of requests (Runner.chunk_rows): one forward for all
    (0, or a limit above the batch), or a few per step give the same tokens bit for bit as one
    forward per request (fp32)."""
    want = None
    for rows in (1, chunk_rows):
        loop = StepLoop(Runner(engine.lm, chunk_rows=rows))
        reqs = [make_request(engine, i) for i in range(6)]
        for r in reqs:
            loop.submit(r)
        loop.run()
        got = [r.tokens for r in reqs]
        if want is None:
            want = got
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_frame_budget_limits_the_batch(engine):
    sched = StepLoop(engine.lm, max_frames=3 * 100)
    reqs = [Request(engine.config.lm, context(100, i), torch.tensor([0]), SamplingConfig(steps=(2, 1, 1, 1)))
            for i in range(3)]
    for r in reqs:
        sched.submit(r)
    sched.step()
    assert len(sched.running) == 1 and len(sched.waiting) == 2
    sched.run()
    assert all(r.done for r in reqs)


def test_partial_target_in_batch(engine):
    T = 50
    target = torch.randint(0, CFG.codebook_size, (CFG.n_q, T), generator=torch.Generator().manual_seed(9))
    hole = torch.zeros(CFG.n_q, T, dtype=torch.bool)
    hole[:, 20:35] = True
    target[hole] = CFG.codebook_size
    sched = StepLoop(engine.lm)
    req = make_request(engine, 0, target=None)
    inp = Request(engine.config.lm, context(T, 3), torch.tensor([1]), SamplingConfig(steps=(4, 2, 2, 2)),
                  target=target.clone())
    sched.submit(req)
    sched.submit(inp)
    sched.run()
    assert torch.equal(inp.tokens[~hole], target[~hole])
    assert (inp.tokens < CFG.codebook_size).all()


def test_threads_match_sequential(engine):
    """32 requests from 4 threads through the service equal sequential runs."""
    specs = [variety(i) | {"i": i} for i in range(32)]
    expected = {s["i"]: engine.generate_tokens(context(s["T"], s["i"]), s["instrument"],
                                               **vars(s["sampling"])) for s in specs}
    handles = {}

    def worker(chunk):
        for s in chunk:
            handles[s["i"]] = engine.submit(context(s["T"], s["i"]), s["instrument"], **vars(s["sampling"]))

    threads = [threading.Thread(target=worker, args=(specs[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, h in handles.items():
        assert torch.equal(h.result(timeout=300), expected[i]), i


def test_cancel_and_invalid_requests(engine):
    started = threading.Event()
    release = threading.Event()

    def slow_progress(level, step, n):
        started.set()
        release.wait(10)

    long = engine.submit(context(120, 1), "drums", steps=(50, 50, 50, 50), progress=slow_progress)
    bad = engine.submit(torch.zeros(3, 10, dtype=torch.long), "drums")          # wrong context shape
    unknown = engine.submit(context(10, 2), "kazoo")
    queued = [engine.submit(context(30, 3 + k), "bass", steps=(2, 2, 1, 1)) for k in range(3)]
    assert started.wait(30)
    long.cancel()
    release.set()
    with pytest.raises(CancelledError):
        long.result(timeout=60)
    with pytest.raises(ValueError, match="context tokens must have shape"):
        bad.result(timeout=1)
    with pytest.raises(ValueError, match="valid names"):
        unknown.result(timeout=1)
    for h in queued:
        assert h.result(timeout=120).shape == (CFG.n_q, 30)
    assert not engine.service.loop.running, "cancelled request freed its slot"


def test_broken_callback_fails_only_its_request(engine):
    def boom(level, step, n):
        raise RuntimeError("callback exploded")

    h1 = engine.submit(context(20, 1), "keys", steps=(2, 1, 1, 1), progress=boom)
    h2 = engine.submit(context(20, 2), "keys", steps=(2, 1, 1, 1))
    with pytest.raises(RequestError, match="callback raised RuntimeError: callback exploded"):
        h1.result(timeout=60)
    assert h2.result(timeout=60).shape == (CFG.n_q, 20)


def test_guidance_of_another_architecture_is_refused_on_construction(engine):
    """MAGNeT's guidance on a StemGen model: one RequestError when the request is made (it used to reach
    admission, where its KeyError failed every other request in the service and left its own job open)."""
    with pytest.raises(RequestError, match="guidance 'magnet' is MAGNeT's; a StemGen model takes multi"):
        Request(engine.lm.cfg, context(10, 1), torch.tensor([0]), SamplingConfig(guidance="magnet"))
    with pytest.raises(RequestError, match="guidance 'magnet' is MAGNeT's"):
        engine.submit(context(10, 1), "drums", guidance="magnet").result(timeout=10)


def test_a_request_that_fails_admission_fails_alone(engine, monkeypatch):
    """Whatever a request's admission raises fails that request only: its handle resolves with the
    error, requests running and queued beside it finish."""
    running = engine.submit(context(40, 4), "bass", steps=(6, 4, 2, 2))
    bad = Request(engine.lm.cfg, context(20, 5), torch.tensor([1]), SamplingConfig(steps=(2, 1, 1, 1)))

    def broken_admit(device):
        raise KeyError("broken state")
    monkeypatch.setattr(bad, "admit", broken_admit)
    handle = engine.service.submit(bad)
    queued = engine.submit(context(30, 6), "keys", steps=(2, 1, 1, 1))
    with pytest.raises(KeyError, match="broken state"):
        handle.result(timeout=60)
    assert running.result(timeout=120).shape == (CFG.n_q, 40)
    assert queued.result(timeout=120).shape == (CFG.n_q, 30)


def test_engine_linear_rows_do_not_depend_on_batch_size():
    """CPU GEMMs switch kernels for small row counts (last-bit differences); engine.model.linear
    keeps a row's result the same whatever else is in the batch."""
    from stemgen.engine.model import linear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(768, 256, generator=g), torch.randn(3000, 256, generator=g)
    full = linear(x, w)
    for n in (1, 2, 3, 7, 100, 255, 256, 1500):
        assert torch.equal(linear(x[:n], w), full[:n]), n
