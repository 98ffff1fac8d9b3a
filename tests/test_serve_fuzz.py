"""Property-based fuzzing of `stemgen serve` over real HTTP (a uvicorn server on 127.0.0.1 in this
process, the tiny model of tests/helpers.py): multipart forms with any field replaced, dropped or
repeated and broken boundaries; chunked and truncated bodies; audio whose header claims huge audio;
JSON text jobs for a MAGNeT model. Every answer is a JSON 4xx (a 2xx for a valid request), never a
5xx or plain text; /healthz answers after every example; the process' peak RSS stays bounded. Last,
a load test: decompression bombs next to a short job and a /healthz poller."""
import contextlib
import io
import json
import logging
import os
import re
import resource
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from stemgen.engine import Engine  # noqa: E402
from stemgen.serve import SAMPLING_FIELDS, TEXT_FIELDS  # noqa: E402

from test_fuzz import json_value, wav_header  # noqa: E402
from test_serve import (STEPS, assert_loop_answered, chunked_post, flac_bomb, model, serving, wait,  # noqa: E402,F401
                        wav_bytes)

try:   # the MAGNeT fixture model (needs transformers for its T5)
    from test_magnet import full_model  # noqa: F401
except pytest.skip.Exception:
    full_model = None

EXAMPLES = int(os.environ.get("STEMGEN_FUZZ_EXAMPLES", 40))     # more for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
LIMITS = dict(max_upload_mb=1.0, max_seconds=20, max_sync_seconds=5)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def rss_at_start():
    return peak_rss_mb()


@pytest.fixture(scope="module")
def server(model, rss_at_start):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    with serving(engine, **LIMITS) as (base, app):
        yield base, app


@pytest.fixture(autouse=True)
def no_errors_logged():
    """A 500 or a traceback the client never sees (it had gone) still fails the test: no ERROR
    record from the server's or uvicorn's loggers (uvicorn's do not reach the root logger)."""
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    yield
    for lg in loggers:
        lg.removeHandler(handler)
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors[:5]]


def parse_response(raw: bytes):
    """(status, content type, body) of a raw HTTP/1.1 response; None for no answer (connection closed)."""
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return int(lines[0].split()[1]), headers.get("content-type", ""), body


def check_answer(base, status, ctype, body, what=""):
    """The property: a JSON 4xx {"error": str}, or a 2xx (a 202 job is cancelled at once, so no work
    piles up); /healthz answers afterwards. -> the status."""
    assert status < 500, (what, status, body[:300])
    if status >= 300:
        assert 400 <= status < 500 and ctype == "application/json", (what, status, ctype, body[:300])
        error = json.loads(body)["error"]
        assert isinstance(error, str), body[:300]
        event(f"{status} " + re.sub(r"[\d.,]+", "N", error.split(":")[0])[:40])
    else:
        event("accepted")
        if status == 202:
            job = json.loads(body)["id"]
            assert httpx.delete(f"{base}/v1/jobs/{job}", timeout=10).status_code == 200
    assert httpx.get(base + "/healthz", timeout=10).status_code == 200
    return status


def post(base, path, body: bytes, content_type: str, chunk: int | None):
    """POST with a Content-Length, or chunked (no Content-Length) in ``chunk``-byte pieces."""
    content = body if chunk is None else iter([body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""])
    r = httpx.post(base + path, content=content, headers={"Content-Type": content_type}, timeout=60)
    assert ("content-length" in r.request.headers) == (chunk is None)
    return r


# --- multipart forms -------------------------------------------------------------------------------

FIELDS = ("file", "instrument", *SAMPLING_FIELDS, "bogus")
PLAUSIBLE = [b"", b"0", b"-1", b"nan", b"inf", b"-inf", b"1e400", b"9" * 5000, b"1,1,1,1", b"0,1,1,1", b"2,1,1,1,1",
             b"1,,1,1", b"-3,1,1,1", b"bass", b"drums", b"[/]x", b"multi", b"single", b"none", b"magnet", b"0.5",
             b"18446744073709551616", b"\x00", "\u0661\u0662".encode(), b"\xff\xfe", b"1" * 70]
values = st.one_of(st.sampled_from(PLAUSIBLE), st.binary(max_size=32),
                   st.text(max_size=24).map(lambda s: s.encode("utf-8", "surrogatepass")),
                   json_value.map(lambda v: json.dumps(v).encode()))


def flac_header(sr: int, channels: int, frames: int, bits: int = 16) -> bytes:
    """A FLAC stream's magic and STREAMINFO block, claiming any rate (20 bits), 1-8 channels and
    frames (36 bits), with no audio frames after it."""
    packed = (sr << 44) | ((channels - 1) << 41) | ((bits - 1) << 36) | frames
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80, 0, 0, len(info)]) + info


RATES = [4000, 16000, 44100, 96000, 384000]
huge_audio = st.one_of(   # headers claiming up to 2^32 Hz, 70 channels, 2^36 frames; a few bytes on disk
    st.builds(lambda sr, ch, n, body: wav_header(sr, ch, n) + body,
              st.one_of(st.sampled_from(RATES), st.integers(0, 2 ** 32 - 1)), st.integers(0, 70),
              st.integers(0, 2 ** 32 - 64), st.binary(max_size=64)),
    st.builds(lambda sr, ch, n, body: flac_header(sr, ch, n) + body,
              st.one_of(st.sampled_from(RATES), st.integers(0, 2 ** 20 - 1)), st.integers(1, 8),
              st.integers(0, 2 ** 36 - 1), st.binary(max_size=64)))
VALID_WAV = wav_bytes(0.3)
files = st.one_of(st.just(VALID_WAV), huge_audio, values,
                  st.integers(0, len(VALID_WAV)).map(lambda n: VALID_WAV[:n]))   # cut anywhere


def render(parts, boundary=b"XyZ") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"\r\nContent-Type: audio/wav'
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


VALID_FORM = [(b"file", b"c.wav", VALID_WAV), (b"instrument", None, b"bass"), (b"steps", None, STEPS.encode()),
              (b"seed", None, b"1")]


def mutated_form(data):
    """A valid form (file, instrument, steps, seed), then 0-4 edits: a field's value replaced by any
    text / bytes / JSON, a part dropped, repeated, added (known or arbitrary name), turned into a
    file part or back."""
    parts = list(VALID_FORM)
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["set", "set", "set", "drop", "repeat", "add", "flip"]))
        if op == "add" or not parts:
            name = data.draw(st.one_of(st.sampled_from(FIELDS).map(str.encode), st.binary(max_size=12)))
            parts.append((name, data.draw(st.sampled_from([None, b"x.wav"])), data.draw(values)))
            continue
        i = data.draw(st.integers(0, len(parts) - 1))
        name, filename, value = parts[i]
        if op == "set":
            parts[i] = (name, filename, data.draw(files if name == b"file" else values))
        elif op == "drop":
            del parts[i]
        elif op == "repeat":
            parts.insert(i, parts[i])
        else:
            parts[i] = (name, None if filename is not None else b"x.wav", value)
    return parts


BREAKS = {
    "none": lambda body, k: (body, "multipart/form-data; boundary=XyZ"),
    "no boundary parameter": lambda body, k: (body, "multipart/form-data"),
    "another boundary": lambda body, k: (body, "multipart/form-data; boundary=AbC"),
    "empty boundary": lambda body, k: (body, 'multipart/form-data; boundary=""'),
    "no closing delimiter": lambda body, k: (body[:-9], "multipart/form-data; boundary=XyZ"),
    "cut anywhere": lambda body, k: (body[:k % (len(body) + 1)], "multipart/form-data; boundary=XyZ"),
    "bare LF": lambda body, k: (body.replace(b"\r\n", b"\n"), "multipart/form-data; boundary=XyZ"),
    "junk header": lambda body, k: (body.replace(b"\r\n\r\n", b"\r\n\x00junk\xff\r\n\r\n", 1),
                                    "multipart/form-data; boundary=XyZ"),
    "url-encoded": lambda body, k: (body, "application/x-www-form-urlencoded"),
    "JSON": lambda body, k: (body, "application/json"),
    "no content type": lambda body, k: (body, ""),
}


@FUZZ
@given(data=st.data())
def test_multipart_forms(server, data):
    """(a) + (b): any form, sent with a Content-Length or chunked, to either endpoint."""
    base, _ = server
    parts = mutated_form(data)
    how = data.draw(st.sampled_from(list(BREAKS) + ["none"] * 5))     # mostly a well-formed body
    body, ctype = BREAKS[how](render(parts), data.draw(st.integers(0, 1 << 20)))
    chunk = data.draw(st.sampled_from([None, 1, 7, 4096]))
    path = data.draw(st.sampled_from(["/v1/jobs", "/v1/generate"]))
    r = post(base, path, body, ctype, chunk)
    status = check_answer(base, r.status_code, r.headers.get("content-type"), r.content, (how, parts))
    if how == "none" and parts == VALID_FORM:
        assert status in (200, 202), r.text      # the untouched form is accepted
        event("valid form")


@FUZZ
@given(audio=huge_audio, path=st.sampled_from(["/v1/jobs", "/v1/generate"]))
def test_audio_whose_header_claims_huge_audio(server, audio, path):
    """(c): a forged WAV / FLAC header (any rate, channel count, length) with a few bytes of body:
    refused from the header (400 or 413) or read as the few samples it holds, never allocated."""
    base, _ = server
    body = render([(b"file", b"c.wav", audio), (b"instrument", None, b"bass"), (b"steps", None, STEPS.encode())])
    r = post(base, path, body, "multipart/form-data; boundary=XyZ", None)
    check_answer(base, r.status_code, r.headers.get("content-type"), r.content, audio[:64])


def send_raw(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection, close our side, -> everything the server answers."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while d := s.recv(1 << 16):
                raw += d
        return raw
    finally:
        s.close()


@FUZZ
@given(cut=st.integers(0, 5000), chunked=st.booleans(), path=st.sampled_from(["/v1/jobs", "/v1/generate"]))
def test_truncated_bodies(server, cut, chunked, path):
    """(b): the client sends part of its body (less than its Content-Length, or a chunked body
    without its last chunk) and closes its side: a JSON 4xx or no answer at all, no job left behind."""
    base, app = server
    body = render([(b"file", b"c.wav", VALID_WAV), (b"instrument", None, b"bass"), (b"steps", None, STEPS.encode())])
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n".encode()
    sent = body[:cut]
    if chunked:
        request = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + sent
    else:
        request = head + b"Content-Length: %d\r\n\r\n" % len(body) + sent
    raw_answer(base, request, request[:200])
    no_live_jobs(app)    # a job whose upload never finished is never queued


def no_live_jobs(app, seconds=10.0):
    t0 = time.time()
    while any(j.live for j in app.state.jobs.values()) and time.time() - t0 < seconds:
        time.sleep(0.02)
    assert not any(j.live for j in app.state.jobs.values()), [j.view() for j in app.state.jobs.values()]


def raw_answer(base, request: bytes, what):
    """Send a raw request, check whatever comes back (the property above, or no answer at all)."""
    answer = parse_response(send_raw(int(base.rsplit(":", 1)[1]), request))
    if answer is None:
        event("no answer")
        assert httpx.get(base + "/healthz", timeout=10).status_code == 200
    else:
        check_answer(base, *answer, what)


header_text = st.one_of(st.sampled_from([b"-1", b"1e3", b" 12", b"0x10", b"99999999999999999999", b"", b"\x00",
                                         b"chunked, chunked", b"gzip", b"identity", b"chunked\x00"]),
                        st.binary(max_size=12))


@FUZZ
@given(data=st.data(), chunked=st.booleans(), path=st.sampled_from(["/v1/jobs", "/v1/generate"]))
def test_broken_http_framing(server, data, chunked, path):
    """(b): a valid form sent with a Content-Length or chunked, its framing broken: a chunk size or the
    Content-Length replaced by any bytes, both framings at once, a junk header line. Whatever the
    layer that notices (uvicorn's HTTP parser, the app), the answer is a JSON 4xx or none."""
    base, app = server
    body = render(VALID_FORM)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), min_size=2, max_size=2)))
    chunks = [body[:cuts[0]], body[cuts[0]:cuts[1]], body[cuts[1]:]]
    sizes = [b"%x" % len(c) for c in chunks]
    framing = [b"Transfer-Encoding: chunked"] if chunked else [b"Content-Length: %d" % len(body)]
    how = data.draw(st.sampled_from(["size", "framing", "both", "junk header", "none"]))
    if how == "size" and chunked:
        sizes[data.draw(st.integers(0, 2))] = data.draw(header_text)
    elif how == "framing":
        framing = [framing[0].split(b": ")[0] + b": " + data.draw(header_text)]
    elif how == "both":
        framing = [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body)]
    elif how == "junk header":
        framing.append(data.draw(header_text))
    head = [f"POST {path} HTTP/1.1".encode(), b"Host: x", b"Content-Type: multipart/form-data; boundary=XyZ",
            *framing]
    request = b"\r\n".join(head) + b"\r\n\r\n"
    if chunked:
        request += b"".join(size + b"\r\n" + c + b"\r\n" for size, c in zip(sizes, chunks)) + b"0\r\n\r\n"
    else:
        request += body
    raw_answer(base, request, (how, request[:300]))
    no_live_jobs(app)


# --- JSON text jobs (MAGNeT) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def magnet_server(request):
    if full_model is None:
        pytest.skip("transformers is not installed")
    engine = Engine.from_pretrained(request.getfixturevalue("full_model"), device="cpu", dtype="float32")
    with serving(engine, **LIMITS) as (base, app):
        yield base, app


VALID_TEXT = {"text": "calm piano", "seconds": 0.5, "steps": [3, 2, 1, 1], "seed": 1}
text_values = st.one_of(json_value, st.sampled_from([0, -1, 1e-9, 1e300, 2 ** 64, True, "3,2,1,1", [3, 2, 1, 1.5],
                                                     [0, 1, 1, 1], {"a": 1, "b": 2, "c": 3, "d": 4}, "x" * 10000,
                                                     "nonoverlap", "stride1", float("nan"), float("inf")]))


@FUZZ
@given(data=st.data())
def test_json_text_jobs(magnet_server, data):
    """(d): a valid text job with fields replaced by any JSON value, dropped or added, or the whole
    body replaced (any JSON, bytes, invalid UTF-8, deep nesting), sent with a Content-Length or chunked."""
    base, _ = magnet_server
    kind = data.draw(st.sampled_from(["fields", "fields", "document", "bytes"]))
    if kind == "fields":
        doc = dict(VALID_TEXT)
        for _ in range(data.draw(st.integers(0, 3))):
            key = data.draw(st.sampled_from(["text", "seconds", *TEXT_FIELDS, "bogus"]))
            if data.draw(st.booleans()):
                doc[key] = data.draw(text_values)
            else:
                doc.pop(key, None)
        body = json.dumps(doc).encode()
    elif kind == "document":
        body = json.dumps(data.draw(json_value)).encode()
    else:
        body = data.draw(st.one_of(st.binary(max_size=64), st.sampled_from([b"[" * 100000, b'{"text": "\xff"}',
                                                                            b'{"text": "a", "seconds": NaN}', b""])))
    chunk = data.draw(st.sampled_from([None, 3, 4096]))
    path = data.draw(st.sampled_from(["/v1/jobs", "/v1/generate"]))
    r = post(base, path, body, "application/json", chunk)
    status = check_answer(base, r.status_code, r.headers.get("content-type"), r.content, body[:200])
    if body == json.dumps(VALID_TEXT).encode():
        assert status in (200, 202), r.text


# --- load: bombs next to a short job ---------------------------------------------------------------

def test_bombs_do_not_hold_up_a_short_job_or_healthz(model, flac_bomb):
    """One client uploads decompression bombs (a 0.5 MB FLAC that decodes to 1.8 GB, then a 64 MB
    chunked upload) while another runs a short /v1/generate and a third polls /healthz every 20 ms.

    Bounds: alone the short job takes about 0.1-0.3 s; 20 s leaves room for a loaded 2-core machine
    (a niced training job, the bombs' own header reads) while a decoded bomb (seconds of FLAC
    decoding and resampling, minutes of codec) would not fit. /healthz must answer within 100 ms
    every time: the event loop never decodes (a stall would show as one slow answer). The peak RSS
    may grow by at most 500 MB: the bomb decoded is 1.8 GB of float32."""
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    rss0 = peak_rss_mb()
    with serving(engine, max_upload_mb=1.0) as (base, _), httpx.Client() as poller, ThreadPoolExecutor(2) as pool:
        port = int(base.rsplit(":", 1)[1])
        poller.get(base + "/healthz")

        def bombs():
            r = httpx.post(base + "/v1/jobs", files={"file": ("bomb.flac", flac_bomb, "audio/flac")},
                           data={"instrument": "bass"}, timeout=120)
            head = render([(b"instrument", None, b"bass"), (b"file", b"c.wav", b"")])[:-11]   # the file part, open
            sent, raw = chunked_post(port, "/v1/jobs", head, total=64 << 20)
            return r, sent, parse_response(raw)

        def short_job():
            t = time.perf_counter()
            r = httpx.post(base + "/v1/generate", files={"file": ("c.wav", wav_bytes(0.5), "audio/wav")},
                           data={"instrument": "drums", "steps": STEPS}, timeout=120)
            return r, time.perf_counter() - t

        bomb, short = pool.submit(bombs), pool.submit(short_job)
        latencies = []
        while not (bomb.done() and short.done()) or len(latencies) < 10:
            t = time.perf_counter()
            assert poller.get(base + "/healthz", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)
        (r, sent, chunked), (job, took) = bomb.result(), short.result()
    assert r.status_code == 413 and "STEMGEN_MAX_SAMPLES" in r.json()["error"], r.text
    assert chunked is not None and chunked[0] == 413 and chunked[1] == "application/json", chunked
    assert sent < 24 << 20, f"the server read {sent / 1e6:.0f} MB of a 64 MB chunked upload before answering"
    assert job.status_code == 200 and job.headers["content-type"] == "audio/wav", job.text
    assert took < 20, f"the short job took {took:.1f} s next to the bombs"
    assert_loop_answered(latencies, "next to the bombs")
    assert peak_rss_mb() - rss0 < 500, f"peak RSS grew by {peak_rss_mb() - rss0:.0f} MB"


def test_memory_stayed_bounded(rss_at_start):
    """Runs after the fuzzers in this module (file order): the peak RSS grew by less than 500 MB
    since the first server started (a decoded 2^27-sample upload alone would be 512 MB)."""
    grew = peak_rss_mb() - rss_at_start
    assert grew < 500, f"peak RSS grew by {grew:.0f} MB during the fuzzing"
