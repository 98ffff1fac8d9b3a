"""`stemgen serve`: an HTTP API (FastAPI on uvicorn) in front of the engine's batched scheduler.
Concurrent HTTP requests become requests of one GenerationService, so they share forwards.

    POST   /v1/jobs                 multipart: file (audio), instrument, sampling options -> 202 {"id", ...}
                                    (StemGen models); or JSON {"text", "seconds", options} (MAGNeT models)
    GET    /v1/jobs/{id}            status, progress (steps done / total), error
    GET    /v1/jobs/{id}/audio      the stem (?format=wav|flac), once done
    DELETE /v1/jobs/{id}            cancel
    POST   /v1/generate             the same form, waits and returns the stem (short contexts only)
    GET    /healthz, /readyz, /metrics (Prometheus), /docs (OpenAPI)

Errors are JSON ``{"error": "..."}`` (a 4xx for the request's own fault); the server keeps serving.
The event loop never decodes, resamples, runs the codec or T5, or encodes: that work runs on a few
worker threads, so /healthz answers at once while an upload is being decoded.
"""
import asyncio
import contextlib
import json
import logging
import math
import queue
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger("stemgen.serve")


@dataclass
class Limits:
    max_upload_mb: float = 50.0
    max_seconds: float = 600.0        # context duration
    max_sync_seconds: float = 30.0    # /v1/generate (synchronous) contexts
    max_jobs: int = 64                # queued + running + finished jobs kept for download
    job_timeout_s: float = 1800.0     # a job still unfinished this long after its upload is cancelled
    max_samples: int | None = None    # decoded samples x channels per upload; None: STEMGEN_MAX_SAMPLES (2^27)
    shutdown_grace_s: float = 5.0     # SIGTERM: longest wait for requests in flight before they are cut

    def check(self) -> None:
        """ValueError (one line, naming the option) for a value out of range."""
        def number(option, value, lo, hi, integer=False):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and lo <= value <= hi and (not integer or float(value).is_integer())
            if not ok:
                raise ValueError(f"{option} {value!r}: must be {'a whole number' if integer else 'a number'} "
                                 f"from {lo:g} to {hi:g}")

        number("--max-upload-mb", self.max_upload_mb, 0.001, 1e6)
        number("--max-seconds", self.max_seconds, 0.001, 1e7)
        number("--max-sync-seconds", self.max_sync_seconds, 0.001, 1e7)
        number("--max-jobs", self.max_jobs, 1, 1e6, integer=True)
        number("--job-timeout", self.job_timeout_s, 0.001, 1e9)
        number("--shutdown-grace", self.shutdown_grace_s, 0, 3600)
        if self.max_samples is not None:
            number("max_samples", self.max_samples, 1, 2 ** 40, integer=True)


class Workers:
    """At most ``n`` blocking calls at a time (decoding, resampling, the codec, T5, encoding), on
    daemon threads: the event loop never runs them, the number of uploads decoded at once (and so
    their memory) is bounded, and a call still running at exit does not hold the process."""

    def __init__(self, n: int, name: str):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                    fut.set_exception(e)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._q.put((fut, fn, args))
        return fut

    async def run(self, fn, *args):
        return await asyncio.wrap_future(self.submit(fn, *args))

    def stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)


@dataclass
class Job:
    id: str
    instrument: str
    steps: int                        # scheduler steps per window
    created: float = field(default_factory=time.time)
    steps_done: int = 0
    status: str = "queued"            # queued | running | done | failed | cancelled
    error: str | None = None
    result: object = None             # engine.api.Generation
    handle: object = None             # the current window's GenerationHandle (None while preparing)
    windows: int = 1
    reason: str | None = None         # set once the job is to be cancelled: why
    settled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the work, set when the upload is prepared: window plan, request factory, tokens so far, context audio
    plan: list = field(default_factory=list)
    make_request: object = None
    tokens: object = None
    context: object = None

    @property
    def total_steps(self) -> int:
        return self.steps * self.windows

    @property
    def live(self) -> bool:
        return self.status in ("queued", "running")

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel a queued (even still preparing) or running job; False if it had already ended."""
        with self.lock:
            if not self.live:
                return False
            if self.reason is None:
                self.reason = reason
            handle = self.handle
        if handle is not None:
            handle.cancel()
        return True

    def view(self) -> dict:
        return {"id": self.id, "status": self.status, "instrument": self.instrument,
                "progress": min(self.steps_done / max(self.total_steps, 1), 1.0), "steps_done": self.steps_done,
                "total_steps": self.total_steps, "windows": self.windows, "error": self.error}


SAMPLING_FIELDS = ("seed", "steps", "guidance", "cfg_context", "cfg_instrument", "cfg_scale", "temperature",
                   "top_k", "top_p", "w_confidence", "w_causal", "w_random")
TEXT_FIELDS = ("seed", "steps", "temperature", "top_k", "top_p", "max_cfg_coef", "min_cfg_coef", "span_arrangement")
MAX_JSON = 1 << 20


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def create_app(engine, limits: Limits | None = None):
    import soundfile as sf
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    from .engine.audio import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, check_budget, max_samples
    from .engine.errors import StemGenError
    from .engine.request import Request as GenRequest
    from .engine.request import check_steps

    limits = limits or Limits()
    limits.check()
    budget = limits.max_samples if limits.max_samples is not None else max_samples()
    jobs: dict[str, Job] = {}
    lock = threading.Lock()
    prepare_pool = Workers(2, "stemgen-prepare")     # uploads: decode, checks, resample, codec encode; T5
    settle_pool = Workers(2, "stemgen-settle")       # finished windows: next window, codec decode
    output_pool = Workers(2, "stemgen-output")       # wav / flac encoding of results
    stopping = threading.Event()
    registry = CollectorRegistry()
    m_requests = Counter("stemgen_requests_total", "HTTP generation requests by outcome", ["outcome"],
                         registry=registry)
    m_latency = Histogram("stemgen_job_seconds", "wall time of finished jobs", registry=registry,
                          buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900))
    Gauge("stemgen_queue_length", "requests waiting or running in the scheduler", registry=registry
          ).set_function(lambda: engine.service.queued)
    Gauge("stemgen_jobs", "jobs held by the server (any state)", registry=registry).set_function(lambda: len(jobs))
    stats = lambda: engine.service.stats  # noqa: E731
    Gauge("stemgen_steps_total", "scheduler steps run", registry=registry).set_function(lambda: stats()["steps"])
    Gauge("stemgen_step_latency_seconds", "mean wall time of a scheduler step", registry=registry).set_function(
        lambda: stats()["step_seconds"] / max(stats()["steps"], 1))
    Gauge("stemgen_frames_per_second", "request-frames stepped per second of stepping", registry=registry
          ).set_function(lambda: stats()["frames"] / max(stats()["step_seconds"], 1e-9))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=watchdog, name="stemgen-watchdog", daemon=True).start()
        yield
        begin_shutdown()                # uvicorn has stopped accepting; cancel whatever is still in flight
        engine.close(cancel=True, timeout=max(limits.shutdown_grace_s, 1.0))
        for pool in (prepare_pool, settle_pool, output_pool):
            pool.stop()

    app = FastAPI(title="StemGen engine", version="1", description=__doc__, lifespan=lifespan)
    app.state.engine, app.state.jobs, app.state.ready, app.state.limits = engine, jobs, True, limits

    def cancel_all(reason: str) -> None:
        with lock:
            live = [j for j in jobs.values() if j.live]
        for j in live:
            try:
                j.cancel(reason)
            except Exception:  # noqa: BLE001 - one job's failure must not keep the others running
                log.exception("cancelling job %s", j.id)

    def begin_shutdown() -> None:
        """SIGTERM: refuse new jobs and cancel those in flight (waiting clients get a 503 at once)."""
        with lock:
            app.state.ready = False
        if not stopping.is_set():
            stopping.set()
            cancel_all("the server is shutting down")

    app.state.begin_shutdown = begin_shutdown

    class CutAtShutdown:
        """Requests still open when uvicorn's grace period ends are cancelled by uvicorn: answer
        them 503 (if nothing was sent yet) with one log line, not a traceback per request."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            started = False

            async def tracking_send(message):
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self.inner(scope, receive, tracking_send)
            except asyncio.CancelledError:
                if scope["type"] != "http" or not stopping.is_set():
                    raise
                log.warning("shutdown: %s %s cut after the %g s grace period", scope.get("method"),
                            scope.get("path"), limits.shutdown_grace_s)
                if not started:
                    with contextlib.suppress(Exception):
                        await JSONResponse({"error": "the server is shutting down"}, status_code=503,
                                           headers={"Connection": "close"})(scope, receive, send)

    app.add_middleware(CutAtShutdown)

    # ---- errors: always JSON {"error": ...} ----

    @app.exception_handler(BadRequest)
    async def _bad(request, e: BadRequest):
        # a refused upload may still be arriving: close the connection rather than read the rest
        headers = {"Connection": "close"} if request.method == "POST" else None
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(StemGenError)
    async def _user_error(_, e: StemGenError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(ClientGone)
    async def _gone(_, e: ClientGone):
        return Response(status_code=499)   # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse({"error": msgs[:500] or "invalid request"}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("internal error")
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    # ---- reading requests: bounded while streaming ----

    async def body_chunks(request: Request, limit: int, what: str):
        """The request body, chunk by chunk, refused (413) as soon as it passes ``limit`` bytes,
        chunked uploads included: nothing past the limit is read."""
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise BadRequest(400, "Content-Length is not a number") from None
            if n > limit:
                raise BadRequest(413, f"{what} of {n / 1e6:.1f} MB exceeds the {limit / 1e6:g} MB limit")
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise BadRequest(413, f"{what} exceeds the {limit / 1e6:g} MB limit")
                yield chunk
        except ClientDisconnect:
            raise ClientGone() from None

    async def read_form(request: Request):
        limit = int(limits.max_upload_mb * 1e6)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        stream = body_chunks(request, limit, "upload")
        if media == "multipart/form-data":
            # file parts spill to a temporary file past 1 MB; the other fields are small
            parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=2 * len(SAMPLING_FIELDS),
                                     max_part_size=64 << 10)
        elif media == "application/x-www-form-urlencoded":
            parser = FormParser(request.headers, stream)
        else:
            raise BadRequest(400, "send a multipart form: a 'file' part with the context audio, an instrument "
                                  "and sampling options")
        try:
            return await parser.parse()
        except MultiPartException as e:
            raise BadRequest(400, f"not a multipart form: {str(e.message)[:200]}") from None

    def option(k: str, v):
        if not isinstance(v, str):
            raise BadRequest(400, f"option {k} must be a plain form field, not a file")
        try:
            if k == "steps":
                return tuple(int(n) for n in str(v).split(","))
            if k == "guidance":
                return str(v)
            if k in ("seed", "top_k"):
                return int(v)
            return float(v)
        except ValueError:
            raise BadRequest(400, f"option {k}={str(v)[:40]!r} is not a valid value") from None

    def sampling_of(opts: dict):
        """The sampling settings, every value the sampler would refuse refused here (400)."""
        try:
            sampling = engine.sampling(**opts)
            check_steps(sampling.steps, engine.config.lm.n_q)
        except (ValueError, TypeError) as e:   # StemGenError included: all the request's own fault
            raise BadRequest(400, str(e)[:500] or "an option has a value of the wrong type") from None
        return sampling

    async def parse_audio(request: Request, sync: bool):
        """Validate the form (everything but the audio itself) before anything is queued."""
        form = await read_form(request)
        try:
            upload = form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise BadRequest(400, "the form needs a 'file' part with the context audio")
            instrument = str(form.get("instrument") or "")
            opts = {k: option(k, v) for k in SAMPLING_FIELDS if (v := form.get(k)) not in (None, "")}
            unknown = sorted(set(form.keys()) - set(SAMPLING_FIELDS) - {"file", "instrument"})
            if unknown:
                raise BadRequest(400, f"unknown field(s): {', '.join(unknown)[:200]}; options are "
                                      f"{', '.join(SAMPLING_FIELDS)}")
            engine.instrument_id(instrument)           # unknown instrument: StemGenError -> 400
            sampling = sampling_of(opts)
        except BaseException:
            await form.close()
            raise
        return upload.file, instrument, sampling, form

    def prepare_audio(job: Job, f, instrument: str, sampling, sync: bool) -> None:
        """On a worker: header checks, decoding, resampling, the codec; then the job is queued."""
        try:
            try:
                info = sf.info(f)
            except Exception:  # noqa: BLE001 - libsndfile's errors for non-audio / corrupt files
                raise BadRequest(400, "the file is not readable audio (wav, flac, ogg, mp3)") from None
            if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE or not 1 <= info.channels <= MAX_CHANNELS:
                raise BadRequest(400, f"sample rate {info.samplerate} Hz / {info.channels} channels not supported "
                                      f"({MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz, 1-{MAX_CHANNELS} channels)")
            seconds = info.frames / info.samplerate
            cap = limits.max_sync_seconds if sync else limits.max_seconds
            if seconds > cap:
                raise BadRequest(413, f"context of {seconds:.1f} s exceeds the {cap:g} s limit"
                                 + ("; use POST /v1/jobs" if sync else ""))
            codec = engine.require_codec()
            try:   # from the header alone, before any sample is decoded
                check_budget(info.frames, info.channels, info.samplerate, codec.cfg.sample_rate, codec.cfg.channels,
                             name="the upload", budget=budget)
            except StemGenError as e:
                raise BadRequest(413, str(e)) from None
            try:
                f.seek(0)
                audio, sr = sf.read(f, dtype="float32", always_2d=True)
            except Exception:  # noqa: BLE001
                raise BadRequest(400, "the file is not readable audio") from None
            if audio.shape[0] == 0 or not np.isfinite(audio).all():
                raise BadRequest(400, "the audio is empty or holds NaN / infinite samples")
            x, ctx = engine.prepare_context(audio.T, sr)
            del audio
            cond = torch.tensor([engine.instrument_id(instrument)], dtype=torch.int64)
            plan = engine.windows(ctx.shape[-1])
            lm = engine.config.lm

            def make_request(k, a, b, progress):   # as Engine.submit / Engine.generate_long build them
                if len(plan) == 1:
                    return GenRequest(lm, ctx, cond, sampling, progress=progress)
                return GenRequest(lm, ctx[..., a:b], cond, _seeded(sampling, sampling.seed + k),
                                  target=job.tokens[:, a:b].clone(), progress=progress)

            tokens = torch.full((lm.n_q, ctx.shape[-1]), lm.mask_id, dtype=torch.int64) if len(plan) > 1 else None
            launch(job, plan, make_request, tokens, x)
        except BaseException:
            forget(job)     # its id was never given out
            raise
        finally:
            f.close()

    async def parse_text(request: Request, sync: bool):
        """A MAGNeT job: JSON {"text": str, "seconds": number (default: the model's segment), options}."""
        body = b"".join([chunk async for chunk in body_chunks(request, MAX_JSON, "a JSON text job")])
        try:
            body = json.loads(body)
        except Exception:  # noqa: BLE001 - the JSON parser's own errors
            raise BadRequest(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, 'the body must be a JSON object: {"text": "...", "seconds": 10}')
        unknown = sorted(set(body) - set(TEXT_FIELDS) - {"text", "seconds"})
        if unknown:
            raise BadRequest(400, f"unknown field(s): {', '.join(unknown)[:200]}; options are text, seconds, "
                                  f"{', '.join(TEXT_FIELDS)}")
        text, seconds = body.get("text"), body.get("seconds")
        if not isinstance(text, str):
            raise BadRequest(400, 'the JSON body needs "text": a string describing the music')
        cap = limits.max_sync_seconds if sync else limits.max_seconds
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not 0 < seconds <= cap):
            raise BadRequest(400, f"seconds must be a number in (0, {cap:g}]")
        opts = {k: (tuple(body[k]) if k == "steps" and isinstance(body[k], list) else body[k])
                for k in TEXT_FIELDS if body.get(k) is not None}
        sampling = sampling_of(opts)
        frames = engine.frames(seconds) if seconds is not None else engine.segment_frames()
        if frames < 1:
            raise BadRequest(400, f"{seconds} s is shorter than one codec frame")
        return text, frames, sampling

    def prepare_text(job: Job, text: str, frames: int, sampling) -> None:
        """On a worker: T5, then the job is queued (windowed as Engine.generate_text past the segment)."""
        from .engine.magnet_request import MagnetRequest
        try:
            memory = engine.text_memory(text)
            plan = engine.windows(frames)
            lm = engine.config.lm

            def make_request(k, a, b, progress):
                if len(plan) == 1:
                    return MagnetRequest(lm, memory, sampling, length=frames, progress=progress)
                return MagnetRequest(lm, memory, _seeded(sampling, sampling.seed + 1000 * k),
                                     target=job.tokens[:, a:b].clone(), progress=progress)

            tokens = torch.full((lm.n_q, frames), lm.mask_id, dtype=torch.int64) if len(plan) > 1 else None
            launch(job, plan, make_request, tokens, None)
        except BaseException:
            forget(job)
            raise

    # ---- jobs ----

    def reserve(instrument: str, steps: int) -> Job:
        with lock:
            if not app.state.ready:
                raise BadRequest(503, "the server is shutting down")
            live = [j for j in jobs.values() if j.live]
            if len(live) >= limits.max_jobs:
                raise BadRequest(429, f"{len(live)} jobs in flight (limit {limits.max_jobs}); retry later")
            while len(jobs) >= limits.max_jobs:    # forget the oldest finished job
                oldest = min((j for j in jobs.values() if not j.live), key=lambda j: j.created)
                del jobs[oldest.id]
            job = Job(uuid.uuid4().hex, instrument, steps)
            jobs[job.id] = job
        return job

    def forget(job: Job) -> None:
        with lock:
            jobs.pop(job.id, None)

    def launch(job: Job, plan, make_request, tokens, context) -> None:
        """Queue the job's first window (validation errors: the request's own, a 400)."""
        with job.lock:
            job.plan, job.make_request, job.tokens, job.context = plan, make_request, tokens, context
            job.windows = len(plan)
        submit_window(job, 0, first=True)

    def submit_window(job: Job, k: int, first: bool = False) -> None:
        def progress(level, step, n):
            job.status = "running"
            job.steps_done += 1

        a, b, _ = job.plan[k]
        with job.lock:
            if job.reason is None:
                try:
                    req = job.make_request(k, a, b, progress)
                except (ValueError, TypeError) as e:
                    if first:
                        raise BadRequest(400, str(e)[:500]) from None
                    raise
                job.handle = engine.service.submit(req)
                handle = job.handle
            else:
                handle = None
        if handle is None:      # cancelled (timed out, client gone, shutdown) before this window started
            finish(job, "cancelled", job.reason)
            return
        handle.future.add_done_callback(lambda _f: settle_pool.submit(settle, job, k, handle))

    def settle(job: Job, k: int, handle) -> None:
        """A window ended: queue the next one, or decode the whole stem."""
        try:
            tokens = handle.result()
            a, b, _ = job.plan[k]
            if job.tokens is None:
                job.tokens = tokens
            else:
                job.tokens[:, a:b] = tokens
            if k + 1 < len(job.plan):
                submit_window(job, k + 1)
                return
            job.result = engine.decode(job.tokens, job.context)
            job.tokens = job.context = job.make_request = None   # what the download does not need
            finish(job, "done")
        except CancelledError:
            finish(job, "cancelled", job.reason or "cancelled")
        except Exception as e:  # noqa: BLE001
            finish(job, "failed", str(e)[:500] or type(e).__name__)

    def finish(job: Job, status: str, error: str | None = None) -> None:
        with job.lock:
            if job.settled.is_set():
                return
            job.status, job.error = status, error
            if status == "done":
                job.steps_done = job.total_steps
            job.settled.set()
        m_requests.labels(status).inc()
        m_latency.observe(time.time() - job.created)

    def watchdog():
        """Cancel jobs older than the job timeout, in whatever state they are (still preparing,
        between windows, running); one job's trouble never stops it."""
        period = min(1.0, max(0.05, limits.job_timeout_s / 4))
        while not stopping.wait(period):
            try:
                now = time.time()
                with lock:
                    candidates = [j for j in jobs.values() if j.live and now - j.created > limits.job_timeout_s]
                for j in candidates:
                    try:
                        j.cancel(f"timed out after {limits.job_timeout_s:g} s (--job-timeout)")
                    except Exception:  # noqa: BLE001
                        log.exception("watchdog: cancelling job %s", j.id)
            except Exception:  # noqa: BLE001
                log.exception("watchdog")

    async def until_done(fut: Future, request: Request, job: Job):
        """Await a worker's result; a client that goes away meanwhile cancels its job."""
        wrapped = asyncio.wrap_future(fut)
        while True:
            done, _ = await asyncio.wait({wrapped}, timeout=0.1)
            if done:
                return wrapped.result()
            if await request.is_disconnected():
                job.cancel("the client disconnected")
                raise ClientGone()

    async def accept(request: Request, sync: bool) -> Job:
        """Parse and validate a request, queue its job (decoding and encoding on a worker)."""
        if not app.state.ready:
            raise BadRequest(503, "the server is shutting down")
        is_json = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        if is_json:
            if engine.kind != "magnet":
                raise BadRequest(400, "this is a StemGen model: send a multipart form with the context audio "
                                      "(file) and an instrument; JSON text jobs are for MAGNeT models")
            text, frames, sampling = await parse_text(request, sync)
            job = reserve("", sum(sampling.steps))
            fut = prepare_pool.submit(prepare_text, job, text, frames, sampling)
        else:
            if engine.kind == "magnet":
                raise BadRequest(400, 'this is a MAGNeT model: send JSON {"text": "...", "seconds": 10} '
                                      "(Content-Type: application/json)")
            f, instrument, sampling, form = await parse_audio(request, sync)
            try:
                job = reserve(instrument, sum(sampling.steps))
            except BaseException:
                await form.close()
                raise
            fut = prepare_pool.submit(prepare_audio, job, f, instrument, sampling, sync)
        await until_done(fut, request, job)
        return job

    def encode(gen, fmt: str) -> tuple[bytes, str]:
        import io
        buf = io.BytesIO()
        sf.write(buf, gen.stem.T, gen.sample_rate, format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue(), "audio/wav" if fmt == "wav" else "audio/flac"

    async def stem_response(job: Job, fmt: str) -> Response:
        if fmt not in ("wav", "flac"):
            raise BadRequest(400, f"format {fmt[:20]!r}: use wav or flac")
        body, mime = await output_pool.run(encode, job.result, fmt)
        return Response(body, media_type=mime)

    def get_job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise BadRequest(404, f"no job {job_id[:64]}")
        return job

    @app.post("/v1/jobs", status_code=202, summary="queue a generation")
    async def submit(request: Request):
        job = await accept(request, sync=False)
        return JSONResponse(job.view(), status_code=202)

    @app.get("/v1/jobs/{job_id}", summary="status and progress")
    async def status(job_id: str):
        return get_job(job_id).view()

    @app.get("/v1/jobs/{job_id}/audio", summary="the generated stem")
    async def audio(job_id: str, format: str = "wav"):
        job = get_job(job_id)
        if job.status != "done":
            raise BadRequest(409, f"job {job_id} is {job.status}" + (f": {job.error}" if job.error else ""))
        return await stem_response(job, format)

    @app.delete("/v1/jobs/{job_id}", summary="cancel")
    async def cancel(job_id: str):
        job = get_job(job_id)
        cancelled = job.cancel("cancelled by DELETE")
        # a job that had already ended keeps (and reports) its own status
        return {"id": job_id, "cancelled": cancelled, "status": "cancelling" if cancelled else job.status}

    @app.post("/v1/generate", summary="generate and wait (short contexts)")
    async def generate_sync(request: Request, format: str = "wav"):
        if format not in ("wav", "flac"):
            raise BadRequest(400, f"format {format[:20]!r}: use wav or flac")
        job = await accept(request, sync=True)
        while not job.settled.is_set():
            if await request.is_disconnected():
                job.cancel("the client disconnected")
                raise ClientGone()
            await asyncio.sleep(0.05)
        if job.status == "done":
            return await stem_response(job, format)
        if job.status == "failed":
            raise BadRequest(500, f"job failed: {job.error}")
        code = 503 if stopping.is_set() else 504 if (job.error or "").startswith("timed out") else 409
        raise BadRequest(code, f"job cancelled: {job.error}")

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/readyz")
    async def readyz():
        if not app.state.ready:
            return JSONResponse({"ready": False}, status_code=503)
        name = getattr(engine.model_dir, "name", None) or str(engine.model_dir or "")
        return {"ready": True, "model": name, "kind": engine.kind, "instruments": engine.instruments}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app


def _seeded(sampling, seed: int):
    import dataclasses
    return dataclasses.replace(sampling, seed=seed)


def http_protocol():
    """uvicorn's HTTP protocol (httptools or h11, as uvicorn picks) with one change: a request whose
    HTTP framing is broken (a bad chunk size or Content-Length, a malformed header line), refused
    before the app sees it, gets a JSON 400 like every other error (uvicorn's own is plain text)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JSONErrors(AutoHTTPProtocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": msg}).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return JSONErrors


def run_server(app, host: str, port: int, shutdown_grace: float = 5.0, sock=None) -> None:
    """uvicorn, with SIGTERM / Ctrl-C as a clean shutdown: stop accepting, cancel the jobs in flight
    at once (waiting clients get a 503), give the connections still open ``shutdown_grace`` seconds,
    then cut them; exit 0 (uvicorn would re-raise the signal after shutting down). ``sock``: an
    already bound socket (the CLI binds before loading the model, so a taken port fails early)."""
    import uvicorn

    class CleanExit(uvicorn.Server):
        def handle_exit(self, sig, frame):
            begin = getattr(app.state, "begin_shutdown", None)
            if begin is not None and not self.should_exit:
                # in a thread: a signal handler must not wait on locks the interrupted code may hold
                threading.Thread(target=begin, name="stemgen-shutdown", daemon=True).start()
            super().handle_exit(sig, frame)
            if hasattr(self, "_captured_signals"):
                self._captured_signals.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_grace,
                            http=http_protocol())
    CleanExit(config).run(sockets=[sock] if sock is not None else None)
