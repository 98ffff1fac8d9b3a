"""Python API: ``Engine.from_pretrained(dir)``, then ``engine.generate(audio, sr, instrument)`` or
``engine.generate_tokens(context_tokens, instrument)``."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import RequestError
from .models import resolve_model
from .audio import AudioError, check_budget, peak_safe, to_format
from .codec import Codec, CodecConfig, load_codec
from .config import ModelConfig, ModelFormatError, SamplingConfig
from .architectures import load_lm
from .model import StemGenEngineLM, default_dtype, resolve_dtype
from .request import Request
from .runner import Runner, run_requests
from .service import GenerationHandle, GenerationService

log = logging.getLogger("stemgen")
_service_lock = threading.Lock()


def _int8_weight_codes() -> str:
    from ..kernels.int8_linear import weight_code_max
    try:
        return weight_code_max()[1]
    except RuntimeError as e:
        return str(e)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


# CPUs without AMX: int8 GEMMs (VNNI, or AVX2's byte products) beat the default dtype's (README, Performance)
INT8_HINT = ("--dtype int8 is faster on this CPU (no AMX), further from fp32 than bf16 (on the demo its sampled "
             "distribution 1.6x as far; README, Performance)")


def backends(device: torch.device, dtype: str | torch.dtype | None = None, arch: str | None = None) -> dict[str, str]:
    """What runs where (reported by `stemgen info`) for ``dtype`` (default: the device's): every op
    of the table, or those of ``arch``."""
    from .. import cpp_ext
    from ..kernels import OPS
    from . import memory
    from .backend import select_ops
    from .architectures import ARCH_OPS
    from .model import read_cpu_flags

    default = default_dtype(device)
    dtype = resolve_dtype(dtype) if dtype is not None else default
    if dtype == torch.int8 and device.type != "cpu":
        raise ValueError("--dtype int8 is the CPU's path; on a GPU use bfloat16 (the default there)")
    ops = select_ops(device, dtype)
    shown = [op for op in OPS.values() if arch is None or op.name in ARCH_OPS[arch]]
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "LM dtype (default)": name(default)
        + (" (CPU has native bf16)" if device.type == "cpu" and default == torch.bfloat16 else "")
        + (f"; {INT8_HINT}" if device.type == "cpu" and dtype != torch.int8 and "amx_int8" not in read_cpu_flags()
           else ""),
        **({"LM dtype (this report)": name(dtype)} if dtype != default else {}),
        **{op.title: ops.names[op.name] for op in shown},
        **({"int8 weight codes": _int8_weight_codes()} if device.type == "cpu" else {}),
        "codec": "PyTorch (engine.codec, fp32; RVQ encode as a GEMM: faster here than the C++ op)"
        + (f"; {_codec_threads()}" if device.type == "cpu" else ""),
        "C++ extension": cpp_ext.status(),
        **({"CPU memory": memory.status()} if device.type == "cpu" else {}),
        "triton": _triton_status(device),
        "CUDA graphs": ("not for MAGNeT models yet" if arch == "magnet" else _graphs_status()) if device.type == "cuda"
        else "CUDA only",
        "torch": torch.__version__,
    }


def _codec_threads() -> str:
    from .threads import codec_threads
    try:
        n = codec_threads()
    except ValueError as e:
        return f"{e}: generation will refuse it"
    return f"{n} CPU thread{'s' if n > 1 else ''} (STEMGEN_CODEC_THREADS), whatever the step loop uses"


def _triton_status(device: torch.device) -> str:
    try:
        import triton
    except ImportError:
        return "not installed" + (": CUDA runs the PyTorch reference ops" if device.type == "cuda" else "")
    use = "in use" if device.type == "cuda" else "used on CUDA only"
    flash = os.environ.get("STEMGEN_FLASH_CONFIG")
    return f"triton {triton.__version__}: {use}" + (f"; flash attention STEMGEN_FLASH_CONFIG={flash}" if flash else "")


def _graphs_status() -> str:
    flag = os.environ.get("STEMGEN_CUDA_GRAPHS")
    if flag == "0":
        return "off (STEMGEN_CUDA_GRAPHS=0)"
    if flag == "1":
        return "on (STEMGEN_CUDA_GRAPHS=1), the background service too"
    if flag is not None:
        return f"STEMGEN_CUDA_GRAPHS={flag!r} is not 0 or 1: generation will refuse it"
    return ("on for generations in the caller's thread (default; --no-cuda-graphs or STEMGEN_CUDA_GRAPHS=0: "
            "off); the background service (serve, folder runs) only with --cuda-graphs / STEMGEN_CUDA_GRAPHS=1")


def check_environment() -> None:
    """The STEMGEN_* variables that are otherwise read later (at the first request or generation),
    checked now: a ValueError (one line) naming the first bad one. For a server's start-up."""
    from .audio import max_samples, max_seconds
    from .runner import cpu_chunk_rows
    from .threads import codec_threads, fixed_threads

    max_seconds()
    max_samples()
    cpu_chunk_rows(1)
    fixed_threads()
    codec_threads()
    choice = os.environ.get("STEMGEN_BACKEND", "auto")
    if choice not in ("auto", "reference", "cpp", "triton"):
        raise ValueError(f"STEMGEN_BACKEND={choice[:40]!r}: use auto, reference, cpp or triton")
    flag = os.environ.get("STEMGEN_CUDA_GRAPHS")
    if flag is not None and flag not in ("0", "1"):
        raise ValueError(f"STEMGEN_CUDA_GRAPHS={flag[:40]!r}: use 1 (on) or 0 (off)")


def default_max_frames(device: torch.device) -> int:
    """The scheduler's frame budget (rows x frames run together in a step). On a GPU, from the
    batch sweep of the paper model (H200, 20 s, multi CFG = 3 rows): throughput reaches 90% of its
    best at batch 4 (12,000 row-frames) and gains under 3% up to batch 32, while every request in
    a larger batch waits longer: 16,384 admits five such requests (3,000 row-frames each). On a CPU the runner cuts a
    batch into cache-sized forwards itself, so a wider budget only batches more requests."""
    return 1 << 14 if torch.device(device).type == "cuda" else 1 << 15


def use_cuda_graphs(lm: StemGenEngineLM, enable: bool | None):
    """CUDA graphs for the trunk, or None. enable=None: on for a CUDA model unless STEMGEN_CUDA_GRAPHS=0
    (on an H200 they took the paper model's 20 s stem at batch 1 from 1.20 s to 1.00 s, and cost
    nothing at batch 4 and 16: bench/RESULTS.md). The Engine's background service takes them only
    when asked for explicitly (Engine.from_pretrained)."""
    from .graphs import TrunkGraphs

    if enable is None:
        flag = os.environ.get("STEMGEN_CUDA_GRAPHS", "1")
        if flag not in ("0", "1"):
            raise ValueError(f"STEMGEN_CUDA_GRAPHS={flag!r}: use 1 (on) or 0 (off)")
        enable = flag == "1" and lm.device.type == "cuda"
    if enable and lm.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the model is on {lm.device}: drop --cuda-graphs")
    return TrunkGraphs(lm) if enable else None


def _fold(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


@dataclass
class Generation:
    stem: np.ndarray          # [channels, N] float32 at sample_rate, peak-safe
    sample_rate: int
    tokens: torch.Tensor      # [Q, T] generated codes
    context: np.ndarray       # the context as the codec heard it [channels, N]
    gain: float               # scaling applied to keep the stem from clipping (1.0: none)

    def mix(self) -> tuple[np.ndarray, float]:
        """Context + stem, scaled down if it would clip."""
        return peak_safe(self.context + self.stem)


class Engine:
    def __init__(self, config: ModelConfig, lm: StemGenEngineLM, codec: Codec | None = None,
                 model_dir: Path | None = None, graphs=None, service_graphs: bool = False):
        self.config = config
        self.lm = lm
        self.runner = Runner(lm, graphs=graphs)   # executes steps: the LM, its CUDA graphs, the sampling op
        # the background service records its own graphs only when they were asked for explicitly
        # (its callers run the codec on other threads meanwhile: engine.graphs)
        self.service_graphs = service_graphs and graphs is not None
        self.codec = codec
        self.model_dir = model_dir
        self.max_frames = default_max_frames(lm.device)   # frames (rows x length) per scheduler step
        self._service: GenerationService | None = None
        self.text_encoder = None   # MAGNeT models: engine.text.TextEncoder

    @property
    def kind(self) -> str:
        """'stemgen' (a context + instrument model) or 'magnet' (text-conditioned)."""
        return self.config.lm.arch

    def require_kind(self, kind: str) -> None:
        if self.kind != kind:
            what = {"stemgen": "a context (audio or codes) and an instrument", "magnet": "a text prompt (--text)"}
            raise RequestError(f"this is a {'MAGNeT' if self.kind == 'magnet' else 'StemGen'} model: it takes "
                               f"{what[self.kind]}, not {what[kind]}")

    # ---- MAGNeT (text-conditioned) models ----

    def text_memory(self, text: str | None = None, conditioning: torch.Tensor | None = None):
        """A request's text memory from a prompt, or from precomputed T5 encoder output [L, width]
        (services can cache those); None for neither (unconditioned)."""
        self.require_kind("magnet")
        if conditioning is not None:
            t5 = torch.as_tensor(conditioning)
            if not t5.is_floating_point() or not bool(torch.isfinite(t5).all()):
                raise RequestError("conditioning must be a finite float tensor [tokens, width] (T5 encoder output)")
            return self.lm.project_text(t5)
        if text is None:
            return None
        return self.lm.project_text(self.text_encoder.encode(text))

    def segment_frames(self) -> int:
        return self.config.lm.segment_frames

    def text_request(self, text: str | None = None, frames: int | None = None, target: torch.Tensor | None = None,
                     conditioning=None, progress=None, sampling: SamplingConfig | None = None, **overrides):
        """A MAGNeT request (engine.magnet_request): ``frames`` long (default: the model's segment), or
        as long as ``target`` [Q, T] (MASK where to generate; a prompt's frames fixed = continuation)."""
        from .magnet_request import MagnetRequest
        memory = self.text_memory(text, conditioning)
        if frames is None and target is None:
            frames = self.segment_frames()
        return MagnetRequest(self.config.lm, memory, self._sampling(sampling, overrides), length=frames,
                             target=target, progress=progress)

    def generate_text_tokens(self, text: str | list[str], frames: int | None = None, target=None, progress=None,
                             variations: int = 1, sampling: SamplingConfig | None = None, **overrides):
        """Codes [Q, T] for a prompt (or a list: one batch, one result each; ``variations`` each with
        seeds seed, seed+1, ...), in this thread."""
        prompts = [text] if isinstance(text, str) or text is None else list(text)
        base = self._sampling(sampling, overrides)
        reqs = [self.text_request(p, frames, target, progress=progress, sampling=dataclasses.replace(base, seed=base.seed + i))
                for p in prompts for i in range(variations)]
        out = [t.cpu() for t in run_requests(self.runner, reqs, self.max_frames)]
        return out[0] if isinstance(text, str) and variations == 1 else out

    def generate_text(self, text: str | list[str], seconds: float | None = None, variations: int = 1,
                      take: np.ndarray | None = None, take_rate: int | None = None, regions=(), progress=None,
                      sampling: SamplingConfig | None = None, window: int | None = None, overlap: int | None = None,
                      **overrides) -> list[Generation]:
        """MAGNeT: audio for a prompt (or each prompt of a list, all in one batch), ``variations``
        each (seeds seed, seed+1, ...), ``seconds`` long (default: the model's segment). ``take``
        (audio [channels, N] at ``take_rate``): without ``regions`` a prompt continued to the end (its
        frames fixed in every level, as audiocraft's generate_continuation); with ``regions``
        [(start_s, end_s)] only those ranges regenerated (inpainting). Longer than the model's segment:
        window by window, each continuing the previous one's last ``overlap`` frames. Results in the
        order prompt 0's variations, prompt 1's, ..."""
        self.require_kind("magnet")
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts:
            raise RequestError("no text prompt given")
        encoded = [self.text_memory(p) for p in prompts]    # validated and encoded once per prompt
        base = self._sampling(sampling, overrides)
        given = None
        if take is not None:
            if take_rate is None:
                raise RequestError("a take needs its sample rate")
            codes = self.prepare_audio(take, take_rate)[1][0]
            if seconds is None and regions:     # inpainting: the take's own length
                T = codes.shape[-1]
            elif seconds:
                T = self.frames(seconds)
            else:                               # continuation: at least the model's segment
                T = max(codes.shape[-1], self.segment_frames())
            given = self.partial_target(codes, T, regions)
        else:
            T = self.frames(seconds) if seconds is not None else self.segment_frames()
        if T < 1:
            raise RequestError(f"{seconds} s is shorter than one codec frame")
        jobs = [(mem, i) for mem in encoded for i in range(variations)]
        tokens = [given.clone() if given is not None else
                  torch.full((self.config.lm.n_q, T), self.mask_id, dtype=torch.int64) for _ in jobs]
        from .magnet_request import MagnetRequest
        for k, (a, b, _) in enumerate(self.windows(T, window, overlap)):
            reqs = [MagnetRequest(self.config.lm, mem, dataclasses.replace(base, seed=base.seed + i + 1000 * k),
                                  target=tok[:, a:b].clone(), progress=progress)
                    for (mem, i), tok in zip(jobs, tokens)]
            for tok, out in zip(tokens, run_requests(self.runner, reqs, self.max_frames)):
                tok[:, a:b] = out.cpu()
        return [self.decode(tok, None) for tok in tokens]

    def submit_text(self, text: str | None = None, frames: int | None = None, target=None, conditioning=None,
                    progress=None, sampling: SamplingConfig | None = None, **overrides) -> GenerationHandle:
        """Queue a MAGNeT request for the batched scheduler (safe from any thread): text requests of
        every thread share forwards. ``.result()`` -> codes [Q, T]."""
        try:
            req = self.text_request(text, frames, target, conditioning, progress, sampling, **overrides)
        except (ValueError, TypeError) as e:
            return GenerationService.failed(e)
        return self.service.submit(req)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None, load_codec_weights: bool = True,
                        cuda_graphs: bool | None = None) -> "Engine":
        """Load an engine model directory ('demo': the trained toy-band demo model). dtype defaults to bfloat16 on CUDA and on CPUs with native
        bf16 arithmetic (AVX512-BF16 / AMX), float32 elsewhere (engine.model.default_dtype).
        cuda_graphs: replay each step's transformer trunk from a CUDA graph (engine.graphs; CUDA
        only; default: on for CUDA unless the environment has STEMGEN_CUDA_GRAPHS=0, for the
        generations run in the caller's thread; the background service only when True or
        STEMGEN_CUDA_GRAPHS=1)."""
        model_dir = resolve_model(model_dir)
        config = ModelConfig.load(model_dir)
        device = pick_device(device)
        dtype = resolve_dtype(dtype) if dtype else default_dtype(device)
        lm = load_lm(config.file(model_dir, "lm"), config.lm, device=device, dtype=dtype)
        if config.lm.arch == "magnet" and cuda_graphs:
            raise ValueError("CUDA graphs are not implemented for MAGNeT models yet (their text memory is not a "
                             "graph input): drop --cuda-graphs")
        graphs = use_cuda_graphs(lm, cuda_graphs) if config.lm.arch != "magnet" else None
        explicit = cuda_graphs is True or (cuda_graphs is None and os.environ.get("STEMGEN_CUDA_GRAPHS") == "1")
        codec = None
        if load_codec_weights and config.codec:
            ccfg = CodecConfig.from_dict(config.codec)
            codec = load_codec(config.file(model_dir, "codec"), ccfg, device=device)
        engine = cls(config, lm, codec, model_dir, graphs=graphs, service_graphs=explicit)
        if config.lm.arch == "magnet":
            from .text import TextEncoder
            engine.text_encoder = TextEncoder(config.file(model_dir, "text_encoder"), device=device)
            if engine.text_encoder.width != config.lm.text_dim:
                raise ModelFormatError(f"{model_dir}: the text encoder's width is {engine.text_encoder.width}, the LM's "
                                       f"text projection takes {config.lm.text_dim}; re-run `stemgen convert`")
        return engine

    @property
    def instruments(self) -> list[str]:
        return list(self.config.instruments)

    def instrument_id(self, instrument: str | int) -> int:
        names = self.config.instruments
        if isinstance(instrument, int) and not isinstance(instrument, bool):
            if not 0 <= instrument < len(names):
                raise ValueError(f"instrument id {instrument} out of range 0..{len(names) - 1}")
            return instrument
        if not isinstance(instrument, str):
            raise RequestError(f"instrument must be a name or an id, got {type(instrument).__name__}")
        if instrument in names:
            return names.index(instrument)
        key = _fold(instrument)   # case-insensitive; 'Synth Pad' matches 'synth_pad'
        matches = [i for i, n in enumerate(names) if _fold(n) == key]
        if len(matches) != 1:
            raise RequestError(f"unknown instrument {instrument!r}; valid names: {', '.join(names)}")
        return matches[0]

    def sampling(self, **overrides) -> SamplingConfig:
        """The model's default sampling settings with ``overrides`` (None values ignored)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config.sampling)}
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self.config.sampling, **{k: v for k, v in overrides.items() if v is not None})

    def generate_tokens(self, context: torch.Tensor, instrument: str | int, target: torch.Tensor | None = None,
                        extra_conditions: list[int] | tuple[int, ...] = (), progress=None,
                        sampling: SamplingConfig | None = None, **overrides):
        """context [C-1, Q, T] codes -> generated target codes [Q, T] (on the CPU), in this thread."""
        self.require_kind("stemgen")
        conditions = torch.tensor([self.instrument_id(instrument), *extra_conditions], dtype=torch.int64)
        req = Request(self.config.lm, context, conditions, self._sampling(sampling, overrides), target=target,
                      progress=progress)
        return run_requests(self.runner, [req], self.max_frames)[0].cpu()

    def submit(self, context: torch.Tensor, instrument: str | int, target: torch.Tensor | None = None,
               extra_conditions: list[int] | tuple[int, ...] = (), progress=None,
               sampling: SamplingConfig | None = None, **overrides) -> GenerationHandle:
        """Queue a token-level request for the batched scheduler (safe from any thread). Returns a
        handle: ``.result()`` gives codes [Q, T], ``.cancel()`` cancels. An invalid request gets a
        handle whose result raises its own error; other requests are unaffected. ``sampling``: a
        SamplingConfig (default: the model's), with ``overrides`` by field name."""
        try:
            self.require_kind("stemgen")
            conditions = torch.tensor([self.instrument_id(instrument), *extra_conditions], dtype=torch.int64)
            req = Request(self.config.lm, context, conditions, self._sampling(sampling, overrides), target=target,
                          progress=progress)
        except (ValueError, TypeError) as e:
            return GenerationService.failed(e)
        return self.service.submit(req)

    def _sampling(self, sampling: SamplingConfig | None, overrides: dict) -> SamplingConfig:
        if sampling is None:
            return self.sampling(**overrides)
        return dataclasses.replace(sampling, **{k: v for k, v in overrides.items() if v is not None})

    def submit_audio(self, audio: np.ndarray, instrument: str | int, sample_rate: int, progress=None,
                     sampling: SamplingConfig | None = None, **overrides) -> "AudioHandle":
        """Queue an audio request: the context is encoded here, the tokens are generated by the
        batched scheduler, and ``.result()`` decodes them (in the caller's thread) to a Generation."""
        try:
            x, ctx = self.prepare_context(np.asarray(audio), sample_rate)
        except (ValueError, TypeError) as e:
            return AudioHandle(self, GenerationService.failed(e), None)
        return AudioHandle(self, self.submit(ctx, instrument, progress=progress, sampling=sampling, **overrides), x)

    def decode(self, tokens: torch.Tensor, context: np.ndarray | None) -> Generation:
        """Generated codes [Q, T] -> the peak-safe stem, trimmed to the context's length (no context:
        T frames of audio, e.g. a MAGNeT generation)."""
        codec = self.require_codec()
        stem = codec.decode(tokens[None])[0].float().cpu().numpy()
        if context is None:
            context = np.zeros_like(stem)
        stem = stem[:, : context.shape[1]]
        stem, gain = peak_safe(stem)
        return Generation(stem=np.ascontiguousarray(stem), sample_rate=codec.cfg.sample_rate, tokens=tokens,
                          context=context, gain=gain)

    @property
    def service(self) -> GenerationService:
        with _service_lock:
            if self._service is None:
                from .graphs import TrunkGraphs

                runner = Runner(self.lm, graphs=TrunkGraphs(self.lm) if self.service_graphs else None)
                self._service = GenerationService(runner, max_frames=self.max_frames)
        return self._service

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop the background scheduler (if one was started): drain queued and running requests,
        or cancel them with ``cancel=True`` (see GenerationService.close)."""
        if self._service is not None:
            self._service.close(cancel=cancel, timeout=timeout)
            self._service = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def prepare_context(self, audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, torch.Tensor]:
        """Audio [channels, N] at any rate -> (audio at the codec's format, context codes [C-1, Q, T])."""
        self.require_kind("stemgen")
        lm = self.config.lm
        if lm.n_channels - 1 != 1:
            raise ValueError(f"this model takes {lm.n_channels - 1} context token streams; audio generation "
                             "supports models with one context stream (use generate_tokens)")
        return self.prepare_audio(audio, sample_rate)

    def prepare_audio(self, audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, torch.Tensor]:
        """Audio [channels, N] at any rate -> (audio at the codec's format, codes [1, Q, T]): a StemGen
        context, or a MAGNeT prompt / take."""
        codec = self.require_codec()
        lm = self.config.lm
        if codec.cfg.bins != lm.codebook_size or codec.cfg.n_q < lm.n_q:
            raise ModelFormatError(f"codec ({codec.cfg.n_q} levels x {codec.cfg.bins} codes) does not fit the LM "
                                   f"({lm.n_q} levels x {lm.codebook_size} codes)")
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise AudioError("context audio must be [channels, samples] with at least one sample")
        if not np.isfinite(audio).all():
            raise AudioError("context audio contains NaN or infinite samples")
        check_budget(audio.shape[1], audio.shape[0], sample_rate, codec.cfg.sample_rate, codec.cfg.channels,
                     name="the context")   # the resampled length, before resampling
        x = to_format(audio, sample_rate, codec.cfg.sample_rate, codec.cfg.channels)
        hop = codec.cfg.hop_length
        if x.shape[1] < hop:
            raise AudioError(f"context is shorter than one codec frame ({x.shape[1]} samples at "
                             f"{codec.cfg.sample_rate} Hz; at least {hop} = {1000 * hop / codec.cfg.sample_rate:g}"
                             " ms needed)")
        if float(np.abs(x).max()) < 1e-6:
            log.warning("the context is silent: the stem will not follow any music")
        codes = codec.encode(torch.from_numpy(x)[None])[0, : lm.n_q]  # [Q, T]
        return x, codes[None].cpu()

    def require_codec(self) -> Codec:
        if self.codec is None:
            raise ModelFormatError(f"model {self.model_dir or ''} has no codec; add one with "
                                   "`stemgen convert --lm CKPT --codec SRC --out DIR`")
        return self.codec

    def generate(self, context=None, instrument: str | int | None = None, sample_rate: int | None = None,
                 progress=None, text: str | None = None, seconds: float | None = None, **sampling):
        """One generation, in this thread.

        StemGen models: ``context`` audio [channels, N] or [N] (numpy, any rate; give ``sample_rate``) ->
        a ``Generation`` whose stem has exactly the context's duration at the codec rate; or context
        codes (an integer tensor [C-1, Q, T]) -> generated codes [Q, T].
        MAGNeT models: ``text`` (and ``seconds``, default the model's segment) -> a ``Generation``."""
        if text is not None or self.kind == "magnet":
            if context is not None or instrument is not None:
                self.require_kind("stemgen")
            self.require_kind("magnet")
            frames = None if seconds is None else self.frames(seconds)
            tokens = self.generate_text_tokens(text, frames, progress=progress, **sampling)
            return self.decode(tokens, None)
        if instrument is None:
            raise RequestError("generate(context, instrument): name the instrument of the new stem")
        if isinstance(context, torch.Tensor) and not context.is_floating_point():
            return self.generate_tokens(context, instrument, progress=progress, **sampling)
        if sample_rate is None:
            raise ValueError("generate(audio, ...) needs sample_rate= (the audio's rate in Hz)")
        x, ctx = self.prepare_context(np.asarray(context), sample_rate)
        return self.generate_from_context(x, ctx, instrument, progress=progress, **sampling)[0]

    @property
    def mask_id(self) -> int:
        """The MASK code of a partial target (positions to generate)."""
        return self.config.lm.mask_id

    def frames(self, seconds: float) -> int:
        """Codec frames in ``seconds`` (rounded)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 1e7:
            raise RequestError(f"{seconds} s: give a finite number of seconds, 0 to 1e7")
        return int(round(seconds * self.require_codec().cfg.frame_rate))

    def window_frames(self, window: float | None, overlap: float | None) -> tuple[int | None, int | None]:
        """``--window`` / ``--overlap`` seconds as frames (None: the default); NaN, infinite or negative
        seconds and a window under one frame are one RequestError line (a 0 window is not the default)."""
        fps = self.require_codec().cfg.frame_rate

        def frames(option: str, seconds, least: int):
            if seconds is None:
                return None
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 1e7:
                raise RequestError(f"--{option} {seconds}: give a finite number of seconds, 0 to 1e7")
            n = int(round(seconds * fps))
            if n < least:
                raise RequestError(f"--{option} {seconds:g} s is {n} frames at {fps:g} frames/s; give at least "
                                   f"{least / fps:g} s")
            return n

        return frames("window", window, 1), frames("overlap", overlap, 0)

    def encode(self, audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, torch.Tensor]:
        """Audio [channels, N] at any rate -> (audio at the codec's format, codes [Q, T])."""
        x, codes = self.prepare_context(audio, sample_rate)
        return x, codes[0]

    def partial_target(self, take: torch.Tensor | None, length: int,
                       regenerate: list[tuple[float, float]] = ()) -> torch.Tensor:
        """A target [Q, length] for regeneration and continuation: the take's codes [Q, T_take]
        where kept, MASK in each ``regenerate`` (start_s, end_s) range and after the take's end."""
        Q = self.config.lm.n_q
        target = torch.full((Q, length), self.mask_id, dtype=torch.int64)
        if take is not None:
            if take.shape[-1] > length:
                raise RequestError(f"the take is {take.shape[-1]} frames, longer than the context's {length}; "
                                   "trim it or give a longer context")
            target[:, : take.shape[-1]] = take[:Q]
        fps = self.require_codec().cfg.frame_rate
        spans = sorted(regenerate)
        for i, (a, b) in enumerate(spans):
            if not (0 <= a < b):
                raise RequestError(f"region {a:g}:{b:g}: needs 0 <= start < end (seconds)")
            if b > length / fps + 1e-6:
                raise RequestError(f"region {a:g}:{b:g} ends after the context's {length / fps:.2f} s")
            if i and a < spans[i - 1][1]:
                raise RequestError(f"regions {spans[i - 1][0]:g}:{spans[i - 1][1]:g} and {a:g}:{b:g} overlap")
            target[:, int(a * fps): max(int(a * fps) + 1, int(round(b * fps)))] = self.mask_id
        return target

    def windows(self, T: int, window: int | None = None, overlap: int | None = None) -> list[tuple[int, int, int]]:
        """Long-form plan: (start, end, fixed) per window over T frames. ``window`` defaults to the
        model's training window (config ``window``; none: one window), ``overlap`` to a quarter of
        it; each window's first ``fixed`` frames continue the previous window's tokens."""
        if window is None:
            window = self.config.window or T
        if window < 1:
            raise RequestError(f"a window of {window} frames: give at least one frame")
        overlap = window // 4 if overlap is None else overlap
        if not 0 <= overlap < window:
            raise RequestError(f"overlap ({overlap} frames) must be smaller than the window ({window} frames)")
        if T <= window:
            return [(0, T, 0)]
        plan, start = [(0, window, 0)], window - overlap
        while plan[-1][1] < T:
            end = min(start + window, T)
            begin = max(0, end - window)            # the last window ends at T, full length
            plan.append((begin, end, plan[-1][1] - begin))
            start = end - overlap
        return plan

    def generate_long(self, x: np.ndarray, ctx: torch.Tensor, instrument: str | int, progress=None,
                      sampling: SamplingConfig | None = None, target: torch.Tensor | None = None,
                      window: int | None = None, overlap: int | None = None) -> Generation:
        """A stem of any length: window by window (see ``windows``), each window seeing its stretch of
        the context and continuing the previous one's overlap, so attention memory stays bounded
        by the window; then one decode (the codec works in chunks)."""
        T = ctx.shape[-1]
        plan = self.windows(T, window, overlap)
        if len(plan) == 1:
            return self.generate_from_context(x, ctx, instrument, progress=progress, sampling=sampling,
                                              target=target)[0]
        base = self._sampling(sampling, {})
        cond = torch.tensor([self.instrument_id(instrument)], dtype=torch.int64)
        tokens = torch.full((self.config.lm.n_q, T), self.mask_id, dtype=torch.int64) if target is None \
            else target.clone()
        for k, (a, b, fixed) in enumerate(plan):
            part = tokens[:, a:b].clone()   # its first `fixed` frames: the previous window's tokens
            req = Request(self.config.lm, ctx[..., a:b], cond, dataclasses.replace(base, seed=base.seed + k),
                          target=part, progress=progress)
            tokens[:, a:b] = run_requests(self.runner, [req], self.max_frames)[0].cpu()
        return self.decode(tokens, x)

    def generate_from_context(self, x: np.ndarray, ctx: torch.Tensor, instrument: str | int, progress=None,
                              variations: int = 1, sampling: SamplingConfig | None = None,
                              target: torch.Tensor | None = None, **overrides) -> list[Generation]:
        """Stems for a prepared context (see prepare_context): ``variations`` of them, seeds seed,
        seed+1, ..., decoded together in one batch (each equals its own single run). ``sampling``:
        a SamplingConfig (default: the model's), with ``overrides`` by field name."""
        self.require_codec()
        base = self._sampling(sampling, overrides)
        cond = torch.tensor([self.instrument_id(instrument)], dtype=torch.int64)
        reqs = [Request(self.config.lm, ctx, cond, dataclasses.replace(base, seed=base.seed + i), target=target,
                        progress=progress) for i in range(variations)]
        return [self.decode(tokens.cpu(), x) for tokens in run_requests(self.runner, reqs, self.max_frames)]


class AudioHandle:
    """A queued audio request: ``.result()`` -> Generation, ``.cancel()``, ``.done()``."""

    def __init__(self, engine: Engine, inner: GenerationHandle, context: np.ndarray | None):
        self.engine, self.inner, self.context = engine, inner, context

    def result(self, timeout: float | None = None) -> Generation:
        return self.engine.decode(self.inner.result(timeout), self.context)

    def cancel(self) -> None:
        self.inner.cancel()

    def done(self) -> bool:
        return self.inner.done()
