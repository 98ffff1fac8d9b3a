"""`stemgen serve`: an HTTP API (FastAPI on uvicorn) in front of the engine's batched scheduler.
Concurrent HTTP requests become requests of one GenerationService, so they share forwards.

    POST   /v1/jobs                 multipart: file (audio), instrument, sampling options -> 202 {"id", ...}
                                    (StemGen models); or JSON {"text", "seconds", options} (MAGNeT models)
    GET    /v1/jobs/{id}            status, progress (steps done / total), error
    GET    /v1/jobs/{id}/audio      the stem (?format=wav|flac), once done
    DELETE /v1/jobs/{id}            cancel
    POST   /v1/generate             the same form, waits and returns the stem (short contexts only)
    GET    /healthz, /readyz, /metrics (Prometheus), /docs (OpenAPI)

Errors are JSON ``{"error": "..."}`` with a 4xx status; the server keeps serving.
"""
import io
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Limits:
    max_upload_mb: float = 50.0
    max_seconds: float = 600.0        # context duration
    max_sync_seconds: float = 30.0    # /v1/generate (synchronous) contexts
    max_jobs: int = 64                # queued + running + finished jobs kept for download
    job_timeout_s: float = 1800.0     # a job still running after this is cancelled


@dataclass
class Job:
    id: str
    instrument: str
    total_steps: int
    created: float = field(default_factory=time.time)
    steps_done: int = 0
    status: str = "queued"            # queued | running | done | failed | cancelled
    error: str | None = None
    result: object = None             # engine.api.Generation
    handle: object = None

    def view(self) -> dict:
        return {"id": self.id, "status": self.status, "instrument": self.instrument,
                "progress": self.steps_done / max(self.total_steps, 1), "steps_done": self.steps_done,
                "total_steps": self.total_steps, "error": self.error}


SAMPLING_FIELDS = ("seed", "steps", "guidance", "cfg_context", "cfg_instrument", "cfg_scale", "temperature",
                   "top_k", "top_p", "w_confidence", "w_causal", "w_random")
TEXT_FIELDS = ("seed", "steps", "temperature", "top_k", "top_p", "max_cfg_coef", "min_cfg_coef", "span_arrangement")


def create_app(engine, limits: Limits | None = None):
    import soundfile as sf
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from .engine.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
    from .engine.errors import StemGenError

    limits = limits or Limits()
    jobs: dict[str, Job] = {}
    lock = threading.Lock()
    decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stemgen-decode")
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
        _app.state.ready = False        # SIGTERM: uvicorn stops accepting, then this cancels in-flight jobs
        engine.close(cancel=True, timeout=10)
        decoder.shutdown(wait=True)

    app = FastAPI(title="StemGen engine", version="1", description=__doc__, lifespan=lifespan)
    app.state.engine, app.state.jobs, app.state.ready = engine, jobs, True

    class BadRequest(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StemGenError)
    async def _user_error(_, e: StemGenError):
        return JSONResponse({"error": str(e)}, status_code=400)

    async def parse(request: Request, sync: bool):
        """Validate the form fully before anything is queued."""
        length = int(request.headers.get("content-length") or 0)
        if length > limits.max_upload_mb * 1e6:
            raise BadRequest(413, f"upload of {length / 1e6:.1f} MB exceeds the {limits.max_upload_mb:g} MB limit")
        try:
            form = await request.form(max_part_size=int(limits.max_upload_mb * 1e6) + 1)
        except Exception as e:  # noqa: BLE001 - the multipart parser's own errors
            raise BadRequest(400, f"not a multipart form: {str(e)[:200]}") from None
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise BadRequest(400, "the form needs a 'file' part with the context audio")
        data = await upload.read()
        if len(data) > limits.max_upload_mb * 1e6:
            raise BadRequest(413, f"upload exceeds the {limits.max_upload_mb:g} MB limit")
        instrument = str(form.get("instrument") or "")
        try:
            info = sf.info(io.BytesIO(data))
        except Exception:  # noqa: BLE001
            raise BadRequest(400, "the file is not readable audio (wav, flac, ogg, mp3)") from None
        if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE or not 1 <= info.channels <= 32:
            raise BadRequest(400, f"sample rate {info.samplerate} Hz / {info.channels} channels not supported")
        seconds = info.frames / info.samplerate
        cap = limits.max_sync_seconds if sync else limits.max_seconds
        if seconds > cap:
            raise BadRequest(413, f"context of {seconds:.1f} s exceeds the {cap:g} s limit"
                             + ("; use POST /v1/jobs" if sync else ""))
        try:
            audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception:  # noqa: BLE001
            raise BadRequest(400, "the file is not readable audio") from None
        if audio.shape[0] == 0 or not np.isfinite(audio).all():
            raise BadRequest(400, "the audio is empty or holds NaN / infinite samples")
        opts = {}
        for k in SAMPLING_FIELDS:
            v = form.get(k)
            if v in (None, ""):
                continue
            try:
                if k == "steps":
                    opts[k] = tuple(int(n) for n in str(v).split(","))
                elif k == "guidance":
                    opts[k] = str(v)
                elif k in ("seed", "top_k"):
                    opts[k] = int(v)
                else:
                    opts[k] = float(v)
            except ValueError:
                raise BadRequest(400, f"option {k}={str(v)[:40]!r} is not a valid value") from None
        unknown = sorted(set(form.keys()) - set(SAMPLING_FIELDS) - {"file", "instrument"})
        if unknown:
            raise BadRequest(400, f"unknown field(s): {', '.join(unknown)}; options are {', '.join(SAMPLING_FIELDS)}")
        engine.instrument_id(instrument)           # unknown instrument: StemGenError -> 400
        sampling = engine.sampling(**opts)         # every range checked here
        from .engine.request import check_steps
        check_steps(sampling.steps, engine.config.lm.n_q)
        return audio.T, sr, instrument, sampling

    async def parse_text(request: Request, sync: bool):
        """A MAGNeT job: JSON {"text": str, "seconds": number (default: the model's segment), options}."""
        length = int(request.headers.get("content-length") or 0)
        if length > 1 << 20:
            raise BadRequest(413, "a JSON text job is at most 1 MB")
        try:
            body = await request.json()
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
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not 0 < seconds <= (limits.max_sync_seconds if sync else limits.max_seconds)):
            raise BadRequest(400, f"seconds must be a number in (0, "
                                  f"{limits.max_sync_seconds if sync else limits.max_seconds:g}]")
        opts = {k: (tuple(body[k]) if k == "steps" and isinstance(body[k], list) else body[k])
                for k in TEXT_FIELDS if body.get(k) is not None}
        try:
            sampling = engine.sampling(**opts)
        except TypeError:
            raise BadRequest(400, "an option has a value of the wrong type") from None
        from .engine.request import check_steps
        check_steps(sampling.steps, engine.config.lm.n_q)
        from starlette.concurrency import run_in_threadpool
        frames = engine.frames(seconds) if seconds is not None else engine.segment_frames()
        memory = await run_in_threadpool(engine.text_memory, text)   # T5 off the event loop
        return memory, frames, None, sampling

    async def parse_any(request: Request, sync: bool):
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            if engine.kind != "magnet":
                raise BadRequest(400, "this is a StemGen model: send a multipart form with the context audio "
                                      "(file) and an instrument; JSON text jobs are for MAGNeT models")
            return ("text", *(await parse_text(request, sync)))
        if engine.kind == "magnet":
            raise BadRequest(400, 'this is a MAGNeT model: send JSON {"text": "...", "seconds": 10} '
                                  "(Content-Type: application/json)")
        return ("audio", *(await parse(request, sync)))

    def start(kind: str, a, b, c, sampling) -> Job:
        """Queue a job: kind "audio" (audio, sample rate, instrument) or "text" (memory, frames, -)."""
        with lock:
            live = [j for j in jobs.values() if j.status in ("queued", "running")]
            if len(live) >= limits.max_jobs:
                raise BadRequest(429, f"{len(live)} jobs in flight (limit {limits.max_jobs}); retry later")
            while len(jobs) >= limits.max_jobs:    # forget the oldest finished job
                oldest = min((j for j in jobs.values() if j.status not in ("queued", "running")),
                             key=lambda j: j.created)
                del jobs[oldest.id]
            job = Job(uuid.uuid4().hex, c if kind == "audio" else "", sum(sampling.steps))
            jobs[job.id] = job

        def progress(level, step, n):
            job.status = "running"
            job.steps_done += 1

        if kind == "audio":   # (audio, sample rate, instrument)
            handle = engine.submit_audio(a, c, b, progress=progress, sampling=sampling)
            future = handle.inner.future
        else:                 # (text memory, frames): the codes are decoded when the job settles
            from .engine.magnet_request import MagnetRequest
            handle = engine.service.submit(MagnetRequest(engine.config.lm, a, sampling, length=b, progress=progress))
            future = handle.future
        job.handle = handle

        def finished(_fut):
            decoder.submit(settle, job)

        future.add_done_callback(finished)
        return job

    def settle(job: Job) -> None:
        try:
            res = job.handle.result()
            job.result = engine.decode(res, None) if isinstance(res, torch.Tensor) else res
            job.status, job.steps_done = "done", job.total_steps
            m_requests.labels("done").inc()
        except Exception as e:  # noqa: BLE001
            cancelled = type(e).__name__ == "CancelledError"
            job.status, job.error = ("cancelled", "cancelled") if cancelled else ("failed", str(e))
            m_requests.labels(job.status).inc()
        m_latency.observe(time.time() - job.created)

    def encode(gen, fmt: str) -> tuple[bytes, str]:
        if fmt not in ("wav", "flac"):
            raise BadRequest(400, f"format {fmt!r}: use wav or flac")
        buf = io.BytesIO()
        sf.write(buf, gen.stem.T, gen.sample_rate, format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue(), "audio/wav" if fmt == "wav" else "audio/flac"

    def get_job(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise BadRequest(404, f"no job {job_id}")
        return job

    def watchdog():
        while app.state.ready:
            now = time.time()
            for j in list(jobs.values()):
                if j.status in ("queued", "running") and now - j.created > limits.job_timeout_s:
                    j.handle.cancel()
            time.sleep(1.0)

    @app.post("/v1/jobs", status_code=202, summary="queue a generation")
    async def submit(request: Request):
        job = start(*(await parse_any(request, sync=False)))
        return job.view()

    @app.get("/v1/jobs/{job_id}", summary="status and progress")
    async def status(job_id: str):
        return get_job(job_id).view()

    @app.get("/v1/jobs/{job_id}/audio", summary="the generated stem")
    async def audio(job_id: str, format: str = "wav"):
        job = get_job(job_id)
        if job.status != "done":
            raise BadRequest(409, f"job {job_id} is {job.status}" + (f": {job.error}" if job.error else ""))
        body, mime = encode(job.result, format)
        return Response(body, media_type=mime)

    @app.delete("/v1/jobs/{job_id}", summary="cancel")
    async def cancel(job_id: str):
        job = get_job(job_id)
        if job.status in ("queued", "running"):
            job.handle.cancel()
        return {"id": job_id, "cancelled": True}

    @app.post("/v1/generate", summary="generate and wait (short contexts)")
    async def generate_sync(request: Request, format: str = "wav"):
        import asyncio

        job = start(*(await parse_any(request, sync=True)))
        while job.status in ("queued", "running") or job.result is None and job.status == "done":
            await asyncio.sleep(0.05)
        if job.status != "done":
            raise BadRequest(500 if job.status == "failed" else 409, f"job {job.status}: {job.error}")
        body, mime = encode(job.result, format)
        return Response(body, media_type=mime)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/readyz")
    async def readyz():
        if not app.state.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "model": str(engine.model_dir), "kind": engine.kind, "instruments": engine.instruments}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app


def run_server(app, host: str, port: int) -> None:
    """uvicorn, with SIGTERM / Ctrl-C as a clean shutdown: stop accepting, cancel the jobs in
    flight (the app's lifespan), exit 0 (uvicorn would re-raise the signal after shutting down)."""
    import uvicorn

    class CleanExit(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if hasattr(self, "_captured_signals"):
                self._captured_signals.clear()

    CleanExit(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
