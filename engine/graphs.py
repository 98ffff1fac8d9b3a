"""CUDA graphs for the transformer trunk of a step (embedding-sum, every layer, final norm).

A step's trunk launches some twenty kernels per layer; a graph replays them all with one launch.
The trunk's shapes depend only on the batch layout (rows and frames of each running request), which
stays the same for many steps (a request runs for hundreds), so one graph is recorded per layout:
on its second consecutive step, after an eager warm-up, keeping the most recent ``max_graphs``
(each holds its own memory pool, about one eager step's activations, and its static inputs).
The step copies the new tokens into the static inputs and replays. The level's head and the
sampling stay outside (the head differs by level).

Recording needs a step without host synchronisation (tests/test_sync_free.py checks that).
On by default on CUDA for generations run in the caller's thread (off: ``cuda_graphs=False``,
``--no-cuda-graphs``, ``STEMGEN_CUDA_GRAPHS=0``): on an H200 they took the paper model's 20 s stem at
batch 1 from 1.20 s to 1.00 s. The background service (HTTP server, folder runs), whose codec work
runs on other threads while a graph may be recording, uses them only when asked for explicitly
(``cuda_graphs=True``, ``--cuda-graphs``, ``STEMGEN_CUDA_GRAPHS=1``), with its own graphs: that mix
has not yet run on a GPU. Recording ignores other threads' CUDA calls (thread-local capture); if a
recording fails anyway, the trunk runs eagerly from then on and the engine logs why once.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger("stemgen")


@dataclass
class _Graph:
    graph: object
    inputs: list[tuple[torch.Tensor, torch.Tensor]]  # static (tokens [R, C, Q, T], conditions [R, S])
    output: torch.Tensor                             # static hidden states [N, d]
    keep: tuple                                      # tensors made outside the graph that it reads


class CudaGraphBackend:
    """What recording and replaying needs from CUDA; tests substitute an eager stand-in."""

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def record(self, graph, fn):
        """Warm up ``fn`` on a side stream, then record it into ``graph``; returns its output."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiles kernels, fills caches: nothing of the kind may happen while recording
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' calls are theirs
            return fn()

    def replay(self, graph) -> None:
        graph.replay()


class TrunkGraphs:
    def __init__(self, model, max_graphs: int = 4, backend: CudaGraphBackend | None = None):
        self.model = model
        self.max_graphs = max_graphs
        self.backend = backend or CudaGraphBackend()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.last_layout: tuple | None = None
        self.recorded = 0   # graphs recorded so far
        self.replays = 0
        self.failed: str | None = None   # why recording failed (the trunk then runs eagerly)
        self._lock = threading.Lock()    # callers in several threads share the static buffers

    @staticmethod
    def layout(pairs) -> tuple:
        return tuple((tuple(t.shape), tuple(c.shape)) for t, c in pairs)

    def hidden(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The trunk's output for these rows: replayed from a graph when this layout has one (a
        copy of the graph's static buffer, so callers in several threads never share one)."""
        if self.failed is None:
            with self._lock:
                out = self._replay(pairs)
            if out is not None:
                return out
        return self.model.hidden(pairs)   # eager, outside the lock: other threads go on

    def _replay(self, pairs) -> torch.Tensor | None:
        """A graph's output for this layout (recorded on its second consecutive step), or None
        when this step runs eagerly."""
        key = self.layout(pairs)
        g = self.graphs.get(key)
        if g is None:
            seen_before = key == self.last_layout
            self.last_layout = key
            if not seen_before:
                return None
            try:
                g = self._record(key, pairs)
            except RuntimeError as e:   # a capture CUDA refused: say so once, stay correct
                self.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.graphs.clear()
                log.warning("CUDA graph recording failed (%s); the trunk runs eagerly from now on", self.failed)
                return None
        self.graphs.move_to_end(key)
        for (st, sc), (t, c) in zip(g.inputs, pairs):
            st.copy_(t)
            sc.copy_(c)
        self.backend.replay(g.graph)
        self.replays += 1
        return g.output.clone()

    def _record(self, key: tuple, pairs) -> _Graph:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        inputs = [(t.clone(), c.clone()) for t, c in pairs]
        graph = self.backend.new_graph()
        output = self.backend.record(graph, lambda: self.model.hidden(inputs))
        max_t = max(t.shape[-1] for t, _ in pairs)
        g = _Graph(graph, inputs, output, keep=self.model.rope(max_t, output.device))
        self.graphs[key] = g
        self.recorded += 1
        return g
