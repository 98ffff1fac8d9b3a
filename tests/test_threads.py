"""CPU threads sized to the cores other processes leave free (engine.threads), with /proc readings
played back: quiet, one other busy core, our own work, niced neighbours, a fixed count."""
import pytest
import torch

from stemgen.engine.threads import ThreadGovernor


class Machine:
    """/proc/stat and /proc/self/stat as counters advanced by ``run(seconds, ours, others, niced)``
    (cores kept busy by this process, by other un-niced processes, by niced ones), 100 ticks/s."""

    def __init__(self, n=2, niced=False):
        self.n, self.t, self.busy, self.total, self.mine, self.niced = n, 0.0, 0, 0, 0, niced

    def run(self, seconds, ours=0.0, others=0.0):
        self.t += seconds
        self.busy += int(100 * seconds * ((0 if self.niced else ours) + others))   # niced time: its own column
        self.total += int(100 * seconds * self.n)
        self.mine += int(100 * seconds * ours)

    def governor(self):
        return ThreadGovernor(interval=1.0, cpu=lambda: (self.busy, self.total, self.n), own=lambda: self.mine,
                              clock=lambda: self.t, usable=self.n, niced=self.niced)


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    monkeypatch.delenv("STEMGEN_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("niced", [False, True])
def test_one_busy_core_leaves_one_thread_and_quiet_gives_both_back(niced):
    m = Machine(2, niced)
    torch.set_num_threads(2)
    g = m.governor()
    g.update()
    m.run(1.5, ours=2.0)                       # quiet: the engine alone, both cores
    assert g.update() == 2 and torch.get_num_threads() == 2
    m.run(1.5, ours=1.0, others=1.0)           # another process takes a core
    assert g.update() == 1 and torch.get_num_threads() == 1
    m.run(0.5, ours=1.0, others=0.0)           # within the interval: no new decision
    assert g.update() == 1
    m.run(1.5, ours=1.0, others=0.0)
    assert g.update() == 2 and torch.get_num_threads() == 2
    m.run(1.5, ours=0.0, others=2.0)           # everything busy elsewhere: still one thread
    assert g.update() == 1


def test_a_fixed_count_is_kept(monkeypatch):
    monkeypatch.setenv("STEMGEN_THREADS", "1")
    m = Machine(2)
    g = m.governor()
    m.run(2, ours=2.0)
    assert g.update() == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "many", "-1", "nan"])
def test_bad_thread_count_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("STEMGEN_THREADS", value)
    with pytest.raises(ValueError, match="STEMGEN_THREADS"):
        ThreadGovernor()


def test_real_proc_readings_are_sane():
    """On this machine's /proc: a measurement after some work of our own leaves at least one thread."""
    g = ThreadGovernor(interval=0.0)
    g.update()
    x = torch.randn(300, 300)
    for _ in range(50):
        x = (x @ x).tanh()
    assert 1 <= g.update() <= g.usable


def test_first_decision_after_a_short_window_then_every_interval():
    """A short generation on a busy machine must not run its first second with a thread too many."""
    m = Machine(2)
    torch.set_num_threads(2)
    g = m.governor()
    g.update()
    m.run(0.1, ours=1.0, others=1.0)
    assert g.update() == 2                      # under 0.2 s: nothing measured yet
    m.run(0.15, ours=1.0, others=1.0)
    assert g.update() == 1 and torch.get_num_threads() == 1
    m.run(0.5, ours=1.0, others=0.0)            # decided: now the whole interval
    assert g.update() == 1
    m.run(0.6, ours=1.0, others=0.0)
    assert g.update() == 2


def test_step_loops_of_a_process_share_one_governor(monkeypatch, tmp_path):
    """A new generation starts from the last decision; a changed STEMGEN_THREADS gets a new governor."""
    from helpers import load_engine_lm, make_model_dir
    from stemgen.engine import threads
    from stemgen.engine.runner import StepLoop
    from stemgen.train import StemGenConfig

    _, d = make_model_dir(tmp_path, StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=16,
                                                  ffn_multiple_of=16))
    lm = load_engine_lm(d)
    a, b = StepLoop(lm), StepLoop(lm)
    assert a.governor is b.governor is threads.process_governor()
    monkeypatch.setenv("STEMGEN_THREADS", "1")
    c = StepLoop(lm)
    assert c.governor is not a.governor and c.governor.fixed == 1 and c.governor is threads.process_governor()


def test_codec_samples_do_not_depend_on_the_callers_threads(monkeypatch, tmp_path):
    """The codec runs with STEMGEN_CODEC_THREADS threads (1 by default), whatever its caller's count:
    its convolutions round differently with another count (before: 4 of 5 lengths differed here
    between 1 and 2 threads), so a busy machine or a server's worker thread changed a stem's bits."""
    import torch.nn.functional as F
    from helpers import tiny_model_dir
    from stemgen.engine import Engine
    from stemgen.engine import codec as codec_mod

    monkeypatch.delenv("STEMGEN_CODEC_THREADS", raising=False)
    codec = Engine.from_pretrained(tiny_model_dir(tmp_path), device="cpu", dtype="float32").codec
    seen = []
    real_elu = F.elu
    monkeypatch.setattr(codec_mod.F, "elu", lambda x: (seen.append(torch.get_num_threads()), real_elu(x))[1])
    for T in (40, 123, 300):
        codes = torch.randint(0, codec.cfg.bins, (1, codec.cfg.n_q, T), generator=torch.Generator().manual_seed(T))
        audio = torch.randn(1, 1, T * codec.cfg.hop_length, generator=torch.Generator().manual_seed(T))
        out = {}
        for n in (2, 1):
            torch.set_num_threads(n)
            out[n] = codec.decode(codes), codec.encode(audio)
            assert torch.get_num_threads() == n          # the caller's count is given back
        assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1]), T
    assert seen and set(seen) == {1}
    monkeypatch.setenv("STEMGEN_CODEC_THREADS", "2")
    seen.clear()
    torch.set_num_threads(1)
    codec.decode(codes)
    assert set(seen) == {2} and torch.get_num_threads() == 1
    monkeypatch.setenv("STEMGEN_CODEC_THREADS", "many")
    with pytest.raises(ValueError, match="STEMGEN_CODEC_THREADS='many': a thread count from 1 to 1024"):
        codec.decode(codes)
