"""Thread-safe submission API: a worker thread owns a Scheduler; callers get futures.

    with GenerationService(model) as service:   # or service.close(cancel=...)
        handle = service.submit(request)        # from any thread
        tokens = handle.result()                # [Q, T] int64 on the CPU
        handle.cancel()                         # queued or running: frees its slot between steps

Progress callbacks run on their own thread, so a slow or raising callback (SystemExit and
KeyboardInterrupt included) delays or fails only its own request, never the scheduler. At
interpreter exit, requests still in flight are cancelled and the worker stops cleanly.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError, Future

from .errors import RequestError
from .request import Request, call_progress
from .runner import StepLoop


def _malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to trim
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return glibc's cached free heap to the OS. Requests of varied sizes from several threads
    otherwise leave resident memory at its high-water mark (allocator caching, not a leak)."""
    if _TRIM is not None:
        _TRIM(0)


class GenerationHandle:
    def __init__(self, request: Request | None, future: Future):
        self.request = request
        self.future = future

    def cancel(self) -> None:
        """Cancel a queued or running request; its future raises CancelledError."""
        if self.request is not None:
            self.request.cancelled = True
        self.future.cancel()  # succeeds only while still queued in the service

    def result(self, timeout: float | None = None):
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class _Callbacks:
    """One thread that runs progress callbacks in order; the scheduler only enqueues them."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="stemgen-callbacks", daemon=True)
        self._thread.start()

    def __call__(self, request: Request, fn, args) -> None:
        self._q.put((request, fn, args))

    def then(self, request: Request, fn) -> None:
        """Run ``fn(request)`` after the request's callbacks queued so far (resolves its future, so
        that a callback's error still fails it)."""
        self._q.put((request, fn, None))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            request, fn, args = item
            if args is None:
                fn(request)
            elif not (request.cancelled or request.error is not None):
                call_progress(request, fn, args)

    def stop(self, timeout: float | None) -> None:
        self._q.put(None)
        self._thread.join(timeout)


class GenerationService:
    def __init__(self, runner, max_frames: int = 1 << 15):
        self.loop = StepLoop(runner, max_frames)
        self._cv = threading.Condition()
        self._incoming: deque[tuple[Request, Future]] = deque()
        self._futures: dict[int, Future] = {}
        self._closed = False
        self._cancel_all = False
        self._thread: threading.Thread | None = None
        self._callbacks: _Callbacks | None = None
        # running totals for monitoring: steps run, their wall seconds, request-frames stepped
        self.stats = {"steps": 0, "step_seconds": 0.0, "frames": 0}
        ref = weakref.ref(self)
        self._atexit = lambda: (s := ref()) is not None and s.close(cancel=True, timeout=30)
        atexit.register(self._atexit)

    def __enter__(self) -> "GenerationService":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def submit(self, request: Request) -> GenerationHandle:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                return self.failed(RequestError("the generation service is closed; start a new one"))
            if request.progress is not None:
                if self._callbacks is None:
                    self._callbacks = _Callbacks()
                request.notify = self._callbacks
            self._incoming.append((request, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="stemgen-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify()
        return GenerationHandle(request, fut)

    @staticmethod
    def failed(error: BaseException) -> GenerationHandle:
        """A handle for a request rejected before it was queued (its own error, nobody else's)."""
        fut: Future = Future()
        fut.set_exception(error)
        return GenerationHandle(None, fut)

    @property
    def queued(self) -> int:
        """Requests waiting or running."""
        return len(self._incoming) + len(self.loop.waiting) + len(self.loop.running)

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests; drain the queued and running ones (``cancel=False``) or cancel
        them (``cancel=True``). With a ``timeout``, whatever is still running when it expires is
        cancelled, so the worker has always stopped when close() returns."""
        with self._cv:
            self._closed = True
            self._cancel_all = self._cancel_all or cancel
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cv:
                    self._cancel_all = True
                    self._cv.notify()
                self._thread.join()
        if self._callbacks is not None:
            self._callbacks.stop(timeout=None if timeout is None else max(timeout, 5))
        atexit.unregister(self._atexit)

    def _loop(self) -> None:
        sched = self.loop
        while True:
            with self._cv:
                if not self._incoming and not sched.has_work:
                    release_free_memory()   # idle: hand the freed activations back to the OS
                while not self._incoming and not sched.has_work and not self._closed:
                    self._cv.wait()
                if self._cancel_all:
                    for req, _ in self._incoming:
                        req.cancelled = True
                    for r in list(sched.running) + list(sched.waiting):
                        r.cancelled = True
                if self._closed and not self._incoming and not sched.has_work:
                    return
                new = list(self._incoming)
                self._incoming.clear()
            for req, fut in new:
                if fut.set_running_or_notify_cancel():
                    self._futures[req.id] = fut
                    sched.submit(req)
            try:
                t0 = time.perf_counter()
                active = sum(r.T for r in sched.running)
                left = sched.step()
                self.stats["steps"] += 1
                self.stats["step_seconds"] += time.perf_counter() - t0
                self.stats["frames"] += active
            except Exception as e:  # noqa: BLE001 - the shared forward failed: its requests fail with the cause
                left = sched.scheduler.drop_all()
                for r in left:
                    r.error = r.error or e
            for r in left:
                if not r.cancelled and r.error is None:
                    r.tokens = r.tokens.cpu()
                if isinstance(r.notify, _Callbacks):
                    r.notify.then(r, self._resolve)
                else:
                    self._resolve(r)

    def _resolve(self, r: Request) -> None:
        fut = self._futures.pop(r.id)
        if r.cancelled:
            fut.set_exception(CancelledError(f"request {r.id} was cancelled"))
        elif r.error is not None:
            fut.set_exception(r.error)
        else:
            fut.set_result(r.tokens)
