"""Thread-safe submission API: a worker thread owns a Scheduler; callers get futures.

    handle = service.submit(request)      # from any thread
    tokens = handle.result()              # [Q, T] int64 on the CPU
    handle.cancel()                       # queued or running: frees its slot between steps
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import CancelledError, Future

from .scheduler import Request, Scheduler


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


class GenerationService:
    def __init__(self, model, max_frames: int = 1 << 15):
        self.scheduler = Scheduler(model, max_frames)
        self._cv = threading.Condition()
        self._incoming: deque[tuple[Request, Future]] = deque()
        self._futures: dict[int, Future] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, request: Request) -> GenerationHandle:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the generation service is closed")
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

    def close(self, timeout: float | None = None) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with self._cv:
                while not self._incoming and not sched.has_work and not self._closed:
                    self._cv.wait()
                if self._closed and not self._incoming and not sched.has_work:
                    return
                new = list(self._incoming)
                self._incoming.clear()
            for req, fut in new:
                if fut.set_running_or_notify_cancel():
                    self._futures[req.id] = fut
                    sched.submit(req)
            try:
                left = sched.step()
            except Exception as e:  # the shared forward failed: every request in it fails with the cause
                left = sched.running + list(sched.waiting)
                sched.running, sched.waiting = [], type(sched.waiting)()
                for r in left:
                    r.error = r.error or e
            for r in left:
                fut = self._futures.pop(r.id)
                if r.cancelled:
                    fut.set_exception(CancelledError(f"request {r.id} was cancelled"))
                elif r.error is not None:
                    fut.set_exception(r.error)
                else:
                    fut.set_result(r.tokens.cpu())
