"""A small Encodec trained on toy-band audio (`stemgen train-codec`).

The architecture is the 32 kHz MusicGen codec's (SEANet encoder/decoder, 2-layer LSTM, RVQ,
50 frames/s, Q levels) at a smaller width. The trainable modules are the `encodec` package's
(SEANet with weight norm; RVQ with k-means init, EMA codebooks and dead-code restarts); the
losses are auraloss's multi-resolution STFT loss plus an L1 waveform term and the RVQ
commitment penalty. No GAN. The result is exported as an audiocraft
``compression_state_dict.bin`` (``best_state`` + ``xp.cfg``), which ``stemgen convert --codec``
reads like a real MusicGen codec.

Training dependencies (``encodec``, ``auraloss``) are imported here only, never by the engine.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import load_corpus_audio
from .loop import (MetricsLog, TrainError, atomic_torch_save, check_memory, check_resumable, load_resume, restore_rng,
                   rng_state, rng_states)


@dataclass
class CodecTrainConfig:
    sample_rate: int = 32000
    n_filters: int = 16
    dimension: int = 64
    ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 4])
    lstm: int = 2
    n_q: int = 4
    bins: int = 512
    segment_s: float = 1.0
    batch_size: int = 8
    steps: int = 2000
    lr: float = 5e-4
    warmup: int = 100
    l1_weight: float = 0.1
    commit_weight: float = 1.0
    seed: int = 0
    songs: int = 0            # 0: every song of the corpus
    # STFT sizes of the multi-resolution loss; 8192/4096 (4-8 Hz bins at 32 kHz) resolve bass pitch
    fft_sizes: list[int] = field(default_factory=lambda: [8192, 4096, 2048, 1024, 512, 256])
    init_from: str = ""       # start from another run's export or last.pt (a fine-tuning stage)
    # bass-band term: the STFT loss of both signals resampled to bass_sr (2 Hz bins at 1 kHz with a
    # 512-point FFT), so that a bass line's pitch, a few bins of the full-band loss, weighs in
    bass_weight: float = 0.0
    bass_sr: int = 1000
    # harmony term: L1 between the per-frame pitch-class profiles (chroma, 150-2500 Hz, each frame
    # normalised to sum 1) of output and input; a frame counts by e / (e + 0.1 x its crop's mean e), e
    # the input's energy in the band (near-silent frames of a crop hardly count); without it a mix's
    # pad and lead lose their chord in the codec (drums and bass win)
    chroma_weight: float = 0.0

    def engine_config(self):
        """The engine's CodecConfig of this codec (what `stemgen convert --codec` will read)."""
        from ..engine.codec import CodecConfig

        return CodecConfig.from_dict(dict(
            sample_rate=self.sample_rate, channels=1, dimension=self.dimension, n_filters=self.n_filters,
            ratios=list(self.ratios), n_residual_layers=1, kernel_size=7, last_kernel_size=7, residual_kernel_size=3,
            dilation_base=2, compress=2, lstm_layers=self.lstm, causal=False, pad_mode="constant", true_skip=True,
            trim_right_ratio=1.0, n_q=self.n_q, bins=self.bins))

    def check(self, device: str = "cpu", stop_at: int | None = None) -> None:
        """Every option through the schema (engine/schema.py: CODEC_TRAIN_OPTIONS, and CODEC_SPEC for
        the codec's sizes, the limits a converted config.json has), then the training memory
        estimated against the machine's: before anything is allocated."""
        from ..engine.codec import expected_codec_shapes
        from ..engine.errors import ModelFormatError
        from ..engine.schema import CODEC_SPEC, CODEC_TRAIN_OPTIONS, Field, check_options

        try:
            check_options(asdict(self), CODEC_TRAIN_OPTIONS)
            check_options({k: getattr(self, k) for k in ("n_filters", "dimension", "bins", "n_q")}, CODEC_SPEC)
            if stop_at is not None:
                check_options({"stop_at": stop_at}, {"stop_at": Field("int", 1, 1 << 40)})
            cfg = self.engine_config()
        except ModelFormatError as e:
            raise TrainError(str(e).replace("codec config.", "codec ")) from None
        # a centred STFT pads half its size on each side by reflection: less than the crop
        length = int(self.segment_s * self.sample_rate)
        if max(self.fft_sizes) // 2 >= length:
            raise TrainError(f"--fft-sizes: {max(self.fft_sizes)} is too long for the {length}-sample training crop")
        if self.bass_weight and 256 >= int(self.segment_s * self.bass_sr):
            raise TrainError(f"--bass-weight: the {self.segment_s:g} s crop is too short for the bass-band STFT")
        if self.chroma_weight and 2048 >= length:
            raise TrainError(f"--chroma-weight: the {self.segment_s:g} s crop is too short for the harmony STFT")
        params = sum(math.prod(s) for s in expected_codec_shapes(cfg).values())
        # weights, gradients, AdamW's moments; and a lower bound of what a step keeps for the backward
        # pass: SEANet's activations (n_filters channels at the full rate, twice as many at each
        # coarser rate, encoder and decoder)
        act = self.batch_size * length * self.n_filters * 20
        check_memory(f"a codec of {params / 1e6:.1f}M parameters with --batch-size {self.batch_size}",
                     16 * params + 4 * act, device, "--n-filters/--dimension/--batch-size")

    def seanet(self) -> dict:
        return dict(channels=1, dimension=self.dimension, n_filters=self.n_filters, ratios=list(self.ratios),
                    n_residual_layers=1, true_skip=True, pad_mode="constant", causal=False,
                    norm="weight_norm", lstm=self.lstm, compress=2)

    def xp_cfg(self) -> str:
        """The audiocraft training config (YAML) that the export carries."""
        import yaml

        return yaml.safe_dump({
            "sample_rate": self.sample_rate, "channels": 1, "compression_model": "encodec",
            "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": self.sample_rate,
                        "channels": 1, "causal": False, "renormalize": False},
            "seanet": {"dimension": self.dimension, "channels": 1, "causal": False, "n_filters": self.n_filters,
                       "n_residual_layers": 1, "ratios": list(self.ratios), "activation": "ELU",
                       "activation_params": {"alpha": 1.0}, "norm": "weight_norm", "norm_params": {},
                       "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 7,
                       "dilation_base": 2, "pad_mode": "constant", "true_skip": True, "compress": 2,
                       "lstm": self.lstm, "disable_norm_outer_blocks": 0,
                       "decoder": {"trim_right_ratio": 1.0}, "encoder": {}},
            "rvq": {"n_q": self.n_q, "q_dropout": False, "bins": self.bins, "decay": 0.99,
                    "kmeans_init": True, "kmeans_iters": 50, "threshold_ema_dead_code": 2},
        }, sort_keys=False)


def build_codec(cfg: CodecTrainConfig) -> torch.nn.ModuleDict:
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer

    return torch.nn.ModuleDict({
        "encoder": SEANetEncoder(**cfg.seanet()),
        "decoder": SEANetDecoder(**cfg.seanet()),
        "quantizer": ResidualVectorQuantizer(dimension=cfg.dimension, n_q=cfg.n_q, bins=cfg.bins,
                                             decay=0.99, kmeans_init=True, kmeans_iters=50,
                                             threshold_ema_dead_code=2),
    })


def random_mixes(songs: list[np.ndarray], batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, length] crops of random non-empty subsets of one song's stems (single stems and mixes:
    the codec must encode both targets and contexts); the peak is normalised to a random level."""
    out = np.zeros((batch, length), dtype=np.float32)
    for b in range(batch):
        stems = songs[int(rng.integers(len(songs)))]  # [S, N]
        for _ in range(8):
            pick = rng.random(stems.shape[0]) < 0.5
            if not pick.any():
                pick[int(rng.integers(stems.shape[0]))] = True
            start = int(rng.integers(0, max(1, stems.shape[1] - length)))
            x = stems[pick, start:start + length].sum(0)
            if np.abs(x).max() > 1e-3:
                break
        out[b, :len(x)] = x / max(np.abs(x).max(), 1e-3) * rng.uniform(0.3, 0.95)
    return out


def chroma_filter(sample_rate: int, n_fft: int, fmin: float = 150.0, fmax: float = 2500.0) -> torch.Tensor:
    """[bins, 12]: each FFT bin between fmin and fmax to its nearest pitch class."""
    assert 0 < fmin < fmax
    f = torch.fft.rfftfreq(n_fft, 1 / sample_rate, dtype=torch.float64)
    m = torch.zeros(len(f), 12)
    sel = torch.nonzero((f >= fmin) & (f <= fmax)).flatten()
    pc = torch.round(12 * torch.log2(f[sel] / 440.0) + 69).long() % 12
    m[sel, pc] = 1.0
    return m


def chroma_loss(y: torch.Tensor, x: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Harmony term (see CodecTrainConfig.chroma_weight) of output y vs input x, both [B, 1, N];
    ``fb`` from chroma_filter (its FFT size is the STFT's)."""
    n_fft = 2 * (fb.shape[0] - 1)
    fb = fb.to(x.device, x.dtype)
    win = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)

    def profile(a):
        mag = torch.stft(a[:, 0], n_fft, n_fft // 4, window=win, return_complex=True).abs()  # [B, F, T]
        c = torch.einsum("bft,fk->btk", mag, fb)
        e = c.sum(-1, keepdim=True)
        return c / (e + 1e-7), e

    py, _ = profile(y)
    px, ex = profile(x)
    w = ex / (ex + 0.1 * ex.mean(dim=1, keepdim=True) + 1e-7)  # ~1 where the band sounds, ~0 in silence
    return ((py - px).abs().sum(-1, keepdim=True) * w).sum() / w.sum().clamp_min(1e-7)


def export_codec(model: torch.nn.ModuleDict, cfg: CodecTrainConfig, path: Path) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"best_state": state, "xp.cfg": cfg.xp_cfg(), "version": "1.3.0", "exported": True,
                       "stemgen_codec_train": asdict(cfg)}, path)


def train_codec(corpus: str | Path, out: str | Path, cfg: CodecTrainConfig, resume: bool = True,
                log=print, every: int = 25, ckpt_every: int = 100, threads: int | None = None,
                stop_at: int | None = None) -> Path:
    """Train (or resume) a codec; writes ``out/last.pt`` (resumable), ``out/metrics.jsonl`` and
    ``out/compression_state_dict.bin`` (the export). Returns the export's path. ``stop_at``: stop
    (checkpoint and export) after that step, the schedule still running over ``cfg.steps``."""
    import auraloss

    cfg.check(stop_at=stop_at)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_codec(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(cfg.steps, 1)))))
    step = 0
    if cfg.init_from:
        try:
            init = torch.load(cfg.init_from, map_location="cpu", weights_only=True)
            model.load_state_dict(init["best_state"] if "best_state" in init else init["model"])
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"{cfg.init_from}: not a codec export of this architecture ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    ck = out / "last.pt"
    if resume and ck.is_file():
        state = load_resume(ck, "codec", asdict(cfg), log, defaults=asdict(CodecTrainConfig()))
        check_resumable(state, ck, model, opt, sched, cfg.steps, rng_states)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        rng = restore_rng(state["rng"], rng)
        log(f"resumed from {ck} at step {step}")
    songs = load_corpus_audio(corpus, cfg.sample_rate, limit=cfg.songs or None, log=log)
    stft = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=list(cfg.fft_sizes),
                                                 hop_sizes=[n // 4 for n in cfg.fft_sizes],
                                                 win_lengths=list(cfg.fft_sizes), sample_rate=cfg.sample_rate)
    bass_stft = auraloss.freq.STFTLoss(fft_size=512, hop_size=64, win_length=512)
    fb = chroma_filter(cfg.sample_rate, 4096)
    length = int(cfg.segment_s * cfg.sample_rate)
    fps = cfg.sample_rate / math.prod(cfg.ratios)
    model.train()
    t0, seen = time.time(), 0
    metrics = MetricsLog(out / "metrics.jsonl")
    end = min(cfg.steps, stop_at or cfg.steps)
    while step < end:
        x = torch.from_numpy(random_mixes(songs, cfg.batch_size, length, rng))[:, None]
        z = model["encoder"](x)
        q = model["quantizer"](z, fps)
        y = model["decoder"](q.quantized)[..., :length]
        rec = stft(y, x)
        l1 = (y - x).abs().mean()
        loss = rec + cfg.l1_weight * l1 + cfg.commit_weight * q.penalty
        if cfg.bass_weight:
            import torchaudio

            low = torchaudio.functional.resample(torch.cat([y, x]), cfg.sample_rate, cfg.bass_sr)
            loss = loss + cfg.bass_weight * bass_stft(low[: len(x)], low[len(x):])
        if cfg.chroma_weight:
            harmony = chroma_loss(y, x, fb)
            loss = loss + cfg.chroma_weight * harmony
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        seen += cfg.batch_size * cfg.segment_s
        if step % every == 0 or step == cfg.steps:
            with torch.no_grad():
                snr = 10 * torch.log10(x.pow(2).mean() / (y - x).pow(2).mean().clamp_min(1e-12))
            rate = seen / (time.time() - t0)
            rec_d = {"step": step, "loss": float(loss), "stft": float(rec), "l1": float(l1),
                     "commit": float(q.penalty), "snr_db": float(snr), "lr": sched.get_last_lr()[0]}
            if cfg.chroma_weight:
                rec_d["chroma"] = float(harmony)
            metrics.write(rec_d)
            eta = (cfg.steps - step) * cfg.batch_size * cfg.segment_s / max(rate, 1e-9)
            log(f"codec step {step}/{cfg.steps} loss {float(loss):.3f} stft {float(rec):.3f} "
                + (f"chroma {float(harmony):.3f} " if cfg.chroma_weight else "")
                + f"snr {float(snr):.1f} dB | {rate:.1f} audio s/s | eta {eta / 60:.1f} min")
        if step % ckpt_every == 0 or step == end:
            atomic_torch_save({"kind": "codec", "config": asdict(cfg), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "step": step, "rng": rng_state(rng)}, ck)
    metrics.close()
    model.eval()
    path = out / "compression_state_dict.bin"
    export_codec(model, cfg, path)
    log(f"codec exported to {path}")
    return path
