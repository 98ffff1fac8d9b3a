"""`stemgen train`: the StemGen LM trained on a Slakh2100-layout corpus (SPEC section 5).

Audio is tokenised once with the codec and cached (``train/data.py``); every step draws SPEC-5
pairs from the cache, masks them as SoundStorm/StemGen do and drops each conditioning source
independently (``StemGenLM.training_loss``). AdamW with linear warm-up and exponential decay,
bf16 autocast where the hardware has native bf16 matrix units, gradient clipping, periodic
validation on held-out songs (loss and accuracy per level), checkpoints that resume exactly
(model, optimizer, schedule, data order, every RNG), a loss-curve PNG. Runs unchanged under
``torchrun`` (DDP; gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.fileutil import atomic_file, atomic_write_text
from .config import StemGenConfig, preset
from .data import PairSampler, TokenCorpus, instrument_name
from .loop import (MetricsLog, TrainError, atomic_torch_save, check_memory, check_resumable, load_resume,
                   rank_states)
from .model import StemGenLM, masked_batch


@dataclass
class TrainConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)   # StemGenConfig overrides (d_model, n_layers, ...)
    frames: int = 500                 # crop length in codec frames (the model's training window)
    batch_size: int = 16              # per process
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    decay_every: int = 1000           # lr *= decay_rate per decay_every steps after warm-up
    decay_rate: float = 0.3
    weight_decay: float = 0.01
    clip: float = 1.0
    val_songs: int = 8                # held-out tracks (the last ones of the corpus)
    val_every: int = 200
    val_batches: int = 4
    ckpt_every: int = 100
    seed: int = 0
    autocast: str = "auto"            # auto | bf16 | off
    blank_prob: float = 0.0           # share of pairs trained as the sampler's first step (not SPEC)
    full_context_prob: float = 0.0    # share of pairs whose context is every other stem (not SPEC)
    init_from: str = ""               # start from these LM weights (fresh optimizer and schedule; step 0 only)


def check_train_config(cfg: TrainConfig, instruments: list[str] | None = None, device: str = "cpu",
                       ) -> StemGenConfig:
    """Every option through the schema (engine/schema.py: TRAIN_OPTIONS, and TRAIN_SPEC for the
    model's sizes, the limits a converted config.json has), then the model's training memory
    estimated on the meta device against the machine's: all before anything is allocated.
    Returns the model config (``instruments`` default to a placeholder for the check)."""
    from ..engine.errors import ModelFormatError
    from ..engine.schema import TRAIN_OPTIONS, TRAIN_SPEC, check, check_options
    from .config import PRESETS

    try:
        check_options(asdict(cfg), TRAIN_OPTIONS)
        if cfg.preset not in PRESETS:
            raise TrainError(f"--preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
        if not isinstance(cfg.model, dict) or any(k not in TRAIN_SPEC or k == "instruments" for k in cfg.model):
            raise TrainError(f"model overrides {sorted(map(str, cfg.model))!r}: only model sizes "
                             f"({', '.join(k for k in TRAIN_SPEC if k != 'instruments')}) can be set")
        check_options(cfg.model, TRAIN_SPEC)
        mcfg = preset(cfg.preset, **{**cfg.model, "instruments": list(instruments or ["instrument"])})
        check(mcfg.to_dict(), TRAIN_SPEC, "model config")
    except ModelFormatError as e:
        raise TrainError(str(e)) from None
    except (TypeError, ValueError) as e:
        if isinstance(e, TrainError):
            raise
        raise TrainError(f"model options: {e}") from None
    with torch.device("meta"):
        params = sum(p.numel() for p in StemGenLM(mcfg).parameters())
    tokens = cfg.batch_size * cfg.frames
    # weights, gradients and AdamW's two moments (fp32), and a lower bound of what one step keeps
    # for the backward pass: per layer and token the block's inputs, q/k/v, the FFN's hidden units;
    # the logits of every level
    act = tokens * (mcfg.n_layers * (8 * mcfg.d_model + 3 * mcfg.ffn_hidden) + 3 * mcfg.n_q * mcfg.codebook_size)
    check_memory(f"an LM of {params / 1e6:.1f}M parameters with --batch-size {cfg.batch_size} x --frames "
                 f"{cfg.frames}", 16 * params + 4 * act, device, "--d-model/--n-layers/--batch-size/--frames")
    return mcfg


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return cfg.decay_rate ** ((step - cfg.warmup) / cfg.decay_every)


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    """bf16 where matrix units do bf16 natively (CUDA with bf16, CPUs with AMX or AVX512-BF16)."""
    if cfg.autocast == "off":
        return None
    if cfg.autocast == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    cap = torch.backends.cpu.get_cpu_capability()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) and "AVX512" in cap else None


@torch.no_grad()
def masked_scores(model: StemGenLM, batches, q: int, frac: float, amp, null_context: bool = False):
    """-> (loss per masked token, accuracy) on level ``q`` of the held-out ``batches`` with a ``frac``
    fraction of its frames masked (fixed generators: the same masks at every validation, the global
    RNG untouched); ``null_context`` replaces every context channel with NULL."""
    nll, correct, count = 0.0, 0, 0
    for k, (tok, inst) in enumerate(batches):
        if null_context:
            tok = tok.clone()
            tok[:, :-1] = model.cfg.null_id
        B = tok.shape[0]
        g = torch.Generator(device=tok.device).manual_seed(1000 * q + k)
        inp, masked = masked_batch(tok, torch.full((B,), q, device=tok.device),
                                   torch.full((B,), frac, device=tok.device), model.cfg.mask_id, g)
        with torch.autocast(tok.device.type, dtype=amp, enabled=amp is not None):
            logits = model(inp, inst[:, None])[:, q].float()
        sel, tgt = logits[masked], tok[:, -1, q][masked]
        nll += float(F.cross_entropy(sel, tgt, reduction="sum"))
        correct += int((sel.argmax(-1) == tgt).sum())
        count += int(masked.sum())
    return nll / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def validate(model: StemGenLM, batches, amp) -> dict:
    """Loss and accuracy per level on fixed held-out batches (each level masked at fraction 0.5),
    and the listening gauge."""
    model.eval()
    n_q = model.cfg.n_q
    out = {}
    for q in range(n_q):
        out[f"val_loss_q{q}"], out[f"val_acc_q{q}"] = masked_scores(model, batches, q, 0.5, amp)
    out["val_loss"] = sum(out[f"val_loss_q{q}"] for q in range(n_q)) / n_q
    out.update(listening(model, batches, amp))
    model.train()
    return out


def listening(model: StemGenLM, batches, amp) -> dict:
    """Does the model listen? Level-0 loss on the held-out targets with EVERY frame masked (the
    sampler's first step: nothing of the target to copy from), given the song's context
    (``val_blank_q0``) and given the NULL context (``val_blank_null_q0``). Their difference
    (``val_listen_gain``, nats per frame) is what the context tells the model; the half-masked
    losses above can be low from in-painting alone."""
    res = {"val_blank_q0": masked_scores(model, batches, 0, 1.0, amp)[0],
           "val_blank_null_q0": masked_scores(model, batches, 0, 1.0, amp, null_context=True)[0]}
    res["val_listen_gain"] = res["val_blank_null_q0"] - res["val_blank_q0"]
    return res


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume: forget the metrics of steps after the checkpoint (a run stopped between two
    checkpoints logged steps it will now redo), so metrics.jsonl holds each step once. A line cut
    short by the kill is not JSON: it goes too."""
    if not path.is_file():
        return

    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except (ValueError, AttributeError):
            return False

    lines = path.read_text().splitlines()
    keep = [line for line in lines if before(line)]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot_curves(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    blank = [(r["step"], r["val_blank_q0"], r["val_blank_null_q0"]) for r in rows if "val_blank_q0" in r]
    fig, axes = plt.subplots(1, 2 if blank else 1, figsize=(12 if blank else 7, 4), squeeze=False)
    ax = axes[0, 0]
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss (mean over levels)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    if blank:
        ax = axes[0, 1]
        steps, ctx, null = zip(*blank)
        ax.plot(steps, ctx, "o-", label="with the song's context")
        ax.plot(steps, null, "s--", label="NULL context")
        ax.set_title("listening: level-0 loss, target fully masked")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


class _Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = self.world > 1 and not torch.distributed.is_initialized()
        if self.owned:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        """Every rank done, then the process group this run made taken down (a gloo group left to
        the interpreter's exit can abort a rank there)."""
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def init_weights(model: StemGenLM, path: str | Path, preset_name: str, overrides: dict) -> None:
    """Load the weights of an LM checkpoint of the same model: a ``model.pt`` (its model config must
    equal this run's, instruments included) or a resumable ``last.pt`` (same preset and overrides)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights, config = state["model"], state["config"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainError(f"--init-from {path}: not a readable LM checkpoint ({type(e).__name__})") from None
    if state.get("format") == "stemgen-train":
        mine = {k: v for k, v in model.cfg.to_dict().items() if k != "cond_dropout"}
        diff = sorted(k for k in mine if config.get(k) != mine[k])
    elif state.get("kind") == "lm":
        diff = [k for k, a, b in (("preset", config.get("preset"), preset_name),
                                  ("model", config.get("model"), overrides)) if a != b]
    else:
        raise TrainError(f"--init-from {path}: not an LM checkpoint of `stemgen train` (model.pt or last.pt)")
    mine = model.state_dict()
    if not diff and (set(weights) != set(mine) or any(weights[k].shape != mine[k].shape for k in mine)):
        diff = ["tensor shapes"]
    if diff:
        raise TrainError(f"--init-from {path}: its LM differs from this run's ({', '.join(diff)}); use the same "
                         "--preset/--d-model/--n-layers/--n-heads, codec and instruments")
    model.load_state_dict(weights)


def train_lm(cache: str | Path, out: str | Path, cfg: TrainConfig, device: str = "cpu", resume: bool = True,
             log=print, progress=None, every: int = 10) -> Path:
    """Train (or resume) the LM on a token cache; returns the path of the final checkpoint
    (``out/model.pt``, a `stemgen.train` checkpoint that `stemgen convert --lm` reads)."""
    out = Path(out)
    dev = torch.device(device)
    check_train_config(cfg, device=device)
    dist = _Dist(dev)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    corpus_all = TokenCorpus(cache)
    n = len(corpus_all.entries)
    if n <= cfg.val_songs:
        raise TrainError(f"{cache}: {n} tracks; need more than --val-songs {cfg.val_songs} (held out)")
    instruments = sorted({instrument_name(c) for c in corpus_all.classes()})
    mcfg = check_train_config(cfg, instruments, device)
    info = json.loads((Path(cache) / "index.json").read_text())
    codes_max = max(int(corpus_all.items[k]["codes"].max()) for k in range(len(corpus_all.items)))
    if codes_max >= mcfg.codebook_size:
        raise TrainError(f"{cache}: codes up to {codes_max} but the model's codebook_size is "
                         f"{mcfg.codebook_size}; pass --codebook-size to match the codec")
    n_q_cache = corpus_all.items[0]["codes"].shape[1]
    if n_q_cache != mcfg.n_q:
        raise TrainError(f"{cache}: the codec has {n_q_cache} levels but the model n_q is {mcfg.n_q}")
    del corpus_all
    train_set = PairSampler(TokenCorpus(cache, list(range(n - cfg.val_songs))), mcfg.instruments, cfg.frames,
                            full_prob=cfg.full_context_prob)
    # validation keeps SPEC 5's uniform contexts, so gauges of runs with other shares compare
    val_set = PairSampler(TokenCorpus(cache, list(range(n - cfg.val_songs, n))), mcfg.instruments, cfg.frames)
    vrng = np.random.default_rng([cfg.seed, 999])
    val_batches = [tuple(t.to(dev) for t in val_set.sample(cfg.batch_size, vrng)) for _ in range(cfg.val_batches)]

    torch.manual_seed(cfg.seed)
    model = StemGenLM(mcfg).to(dev)
    runner = _DDPForward(model) if dist.world > 1 else model
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    rng = np.random.default_rng([cfg.seed, dist.rank])
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1000 + dist.rank)
    step = 0
    ck = out / "last.pt"
    # init_from only matters at step 0: a resumed run need not repeat it (nor find the file again)
    run_cfg = {**asdict(cfg), "cache_key": info["key"], "world": dist.world}
    run_cfg.pop("init_from")
    if resume and ck.is_file():
        state = load_resume(ck, "lm", run_cfg, log, defaults=asdict(TrainConfig()))
        check_resumable(state, ck, model, opt, sched, cfg.steps, rank_states(dist.world, gen))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        r = state["ranks"][dist.rank]
        rng.bit_generator.state = r["numpy"]
        gen.set_state(r["gen"])
        torch.set_rng_state(r["torch"])
        if dist.main:
            drop_metrics_after(out / "metrics.jsonl", step)
            log(f"resumed from {ck} at step {step}")
    elif cfg.init_from:
        init_weights(model, cfg.init_from, cfg.preset, cfg.model)
        if dist.main:
            log(f"started from the weights of {cfg.init_from} (fresh optimizer and schedule)")
    amp = autocast_dtype(cfg, dev)
    if dist.main:
        params = sum(p.numel() for p in model.parameters())
        log(f"LM {mcfg.d_model}d x {mcfg.n_layers} layers ({params / 1e6:.1f}M params), instruments "
            f"{', '.join(mcfg.instruments)}; {len(train_set.targets)} training targets; "
            f"{'bf16 autocast' if amp else 'fp32'} on {dev}; {dist.world} process(es)")
    metrics = MetricsLog(out / "metrics.jsonl") if dist.main else None
    t0, frames_seen, step0 = time.time(), 0, step
    model.train()
    while step < cfg.steps:
        tok, inst = (t.to(dev) for t in train_set.sample(cfg.batch_size, rng))
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = StemGenLM.training_loss(runner, tok, inst[:, None], generator=gen, blank_prob=cfg.blank_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        step += 1
        frames_seen += tok.shape[0] * tok.shape[-1] * dist.world
        loss_value = loss.detach().item()
        if not math.isfinite(loss_value):
            raise TrainError(f"loss became {loss_value} at step {step}; lower --lr")
        if dist.main:
            rate = frames_seen / (time.time() - t0)
            if progress:
                progress(step, cfg.steps, loss_value, rate)
            if step % every == 0 or step == cfg.steps:
                metrics.write({"step": step, "loss": loss_value, "grad_norm": float(gnorm),
                               "lr": sched.get_last_lr()[0], "frames_per_s": rate})
                if not progress:
                    eta = (cfg.steps - step) / max((step - step0) / (time.time() - t0), 1e-9)
                    log(f"step {step}/{cfg.steps} loss {loss_value:.3f} lr {sched.get_last_lr()[0]:.2e} "
                        f"| {rate:.0f} frames/s | eta {eta / 60:.1f} min")
        if step % cfg.val_every == 0 or step == cfg.steps:
            if dist.main:
                v = validate(model, val_batches, amp)
                metrics.write({"step": step, **v})
                log(f"validation at step {step}: loss {v['val_loss']:.3f}; accuracy per level "
                    + " ".join(f"{v[f'val_acc_q{q}']:.3f}" for q in range(mcfg.n_q))
                    + f"; blank level 0 {v['val_blank_q0']:.3f} (NULL context {v['val_blank_null_q0']:.3f}, "
                    f"listening gain {v['val_listen_gain']:.3f})")
                plot_curves(out / "metrics.jsonl", out / "loss.png")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            ranks = dist.gather({"numpy": rng.bit_generator.state, "gen": gen.get_state(),
                                 "torch": torch.get_rng_state()})
            if dist.main:
                atomic_torch_save({"kind": "lm", "config": run_cfg, "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "step": step, "ranks": ranks}, ck)
    final = out / "model.pt"
    if dist.main:
        metrics.close()
        atomic_torch_save({"format": "stemgen-train", "config": mcfg.to_dict(),
                           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                           "step": step, "train_config": asdict(cfg)}, final)
        log(f"LM checkpoint written to {final}")
    dist.close()
    return final


class _DDPForward:
    """Runs StemGenLM.training_loss with its forward call going through DDP (gradients all-reduced)."""

    def __init__(self, model: StemGenLM):
        self.cfg = model.cfg
        self.ddp = torch.nn.parallel.DistributedDataParallel(model)

    def __call__(self, inp, cond):
        return self.ddp(inp, cond)
