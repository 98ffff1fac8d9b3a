"""Training data from a Slakh2100-layout folder (the toy-band corpus or real Slakh2100).

- ``load_corpus_audio``: every track's rendered stems at the codec's rate (codec training).
- ``tokenize_corpus``: each track tokenised ONCE with the engine's codec and cached on disk
  (``tokens.safetensors`` + ``index.json``): every single stem and every mix of a subset of the
  track's stems (contexts are random subsets, SPEC 5), so training never runs the codec.
- ``PairSampler``: context/target pairs exactly as SPEC 5, drawn from the cache with an explicit
  numpy Generator (its state is checkpointed, so data order resumes exactly).
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .loop import TrainError

CACHE_VERSION = 1
MAX_STEMS = 6   # subsets are enumerated: at most 2**MAX_STEMS - 1 mixes per track


def instrument_name(inst_class: str) -> str:
    """Slakh inst_class ('Synth Pad') -> config instrument name ('synth_pad')."""
    return inst_class.strip().lower().replace(" ", "_")


def corpus_tracks(corpus: str | Path) -> list[Path]:
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise TrainError(f"{corpus}: no such corpus folder; make one with `stemgen make-corpus toy --songs 200`")
    tracks = sorted(p for p in corpus.iterdir() if (p / "metadata.yaml").is_file())
    if not tracks:
        raise TrainError(f"{corpus}: no Slakh2100-layout tracks (folders with metadata.yaml)")
    return tracks


def read_track(track: Path, sr: int) -> tuple[list[str], np.ndarray]:
    """-> (inst_class per stem, stems [S, N] mono float32 at ``sr``)."""
    import soundfile as sf
    import soxr
    import yaml

    try:
        meta = yaml.safe_load((track / "metadata.yaml").read_text())
        stems_meta = meta["stems"]
        audio_dir = track / meta.get("audio_dir", "stems")
    except Exception as e:  # noqa: BLE001
        raise TrainError(f"{track}/metadata.yaml: unreadable ({type(e).__name__}: {e})") from None
    classes, waves = [], []
    for sid, info in stems_meta.items():
        if not isinstance(info, dict) or not info.get("audio_rendered", True):
            continue
        path = next((audio_dir / f"{sid}{ext}" for ext in (".wav", ".flac") if (audio_dir / f"{sid}{ext}").is_file()),
                    None)
        if path is None:
            continue
        try:
            x, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"{path}: not a readable audio file ({e})") from None
        x = x.mean(axis=1)
        if file_sr != sr:
            x = soxr.resample(x, file_sr, sr).astype(np.float32)
        if not np.isfinite(x).all():
            raise TrainError(f"{path}: NaN or infinite samples")
        classes.append(str(info.get("inst_class", "unknown")))
        waves.append(x)
    if not waves:
        raise TrainError(f"{track}: no rendered stems found")
    n = max(len(w) for w in waves)
    stems = np.zeros((len(waves), n), dtype=np.float32)
    for i, w in enumerate(waves):
        stems[i, :len(w)] = w
    return classes, stems


def load_corpus_audio(corpus, sr: int, limit: int | None = None, log=print) -> list[np.ndarray]:
    tracks = corpus_tracks(corpus)[:limit]
    log(f"reading {len(tracks)} tracks of {corpus} at {sr} Hz ...")
    return [read_track(t, sr)[1] for t in tracks]


CONTEXT_SETS = ("all", "rest")


def _subsets(n: int, contexts: str = "all") -> list[tuple[int, ...]]:
    """The mixes to tokenise: 'all' = every non-empty subset of the n stems (SPEC 5: any subset of the
    other stems can be a context); 'rest' = each single stem and each all-but-one mix (2n mixes
    instead of 2**n - 1: contexts are then one other stem or all of them)."""
    if contexts == "rest":
        singles = [(i,) for i in range(n)]
        rest = [tuple(j for j in range(n) if j != i) for i in range(n)] if n > 2 else []
        return singles + [r for r in rest if r not in singles]
    return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


def tokenize_corpus(corpus, codec, codec_key: str, cache: str | Path, contexts: str = "all", log=print) -> Path:
    """Encode every track's stems and stem-subset mixes once; returns the cache folder.
    ``codec``: an engine ``Codec``; ``codec_key``: a fingerprint of its weights. A finished cache for the same corpus and codec is reused."""
    cache = Path(cache)
    tracks = corpus_tracks(corpus)
    key = {"version": CACHE_VERSION, "corpus": str(Path(corpus).resolve()), "tracks": [t.name for t in tracks],
           "codec": codec_key, "contexts": contexts}
    if contexts not in CONTEXT_SETS:
        raise TrainError(f"contexts {contexts!r}: use one of {', '.join(CONTEXT_SETS)}")
    index_path = cache / "index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            index = None
        if index and index.get("key") == key:
            return cache
        log(f"{cache}: token cache is for another corpus or codec; rebuilding")
    cache.mkdir(parents=True, exist_ok=True)
    sr, hop = codec.cfg.sample_rate, codec.cfg.hop_length
    entries, arrays = [], {}
    for i, track in enumerate(tracks):
        classes, stems = read_track(track, sr)
        if len(classes) > MAX_STEMS:
            raise TrainError(f"{track}: {len(classes)} stems; at most {MAX_STEMS} per track are supported")
        subsets = _subsets(len(classes), contexts)
        mixes = np.stack([stems[list(s)].sum(0) for s in subsets])      # [M, N]
        peak = np.abs(mixes).max(axis=1, keepdims=True)
        mixes = mixes / np.maximum(peak / 0.99, 1.0)                       # no clipping, never louder
        T = stems.shape[1] // hop
        codes = codec.encode(torch.from_numpy(mixes[:, None, :T * hop].copy()))  # [M, Q, T]
        energy = np.sqrt((mixes[:, :T * hop].reshape(len(subsets), T, hop) ** 2).mean(-1))  # [M, T]
        arrays[f"{i}.codes"] = codes.to(torch.int16).contiguous()
        arrays[f"{i}.rms"] = torch.from_numpy(energy.astype(np.float32))
        entries.append({"track": track.name, "classes": classes, "subsets": [list(s) for s in subsets], "frames": T})
        log(f"tokenised {i + 1}/{len(tracks)} {track.name}: {len(subsets)} mixes x {T} frames")
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    os.close(fd)
    save_file(arrays, tmp)
    os.replace(tmp, cache / "tokens.safetensors")
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "tracks": entries}, f)
    os.replace(tmp, index_path)
    return cache


class TokenCorpus:
    """The token cache in memory: per track, codes of every subset mix [M, Q, T] and frame RMS."""

    def __init__(self, cache: str | Path, tracks: list[int] | None = None):
        from safetensors.torch import load_file

        cache = Path(cache)
        try:
            index = json.loads((cache / "index.json").read_text())
            arrays = load_file(str(cache / "tokens.safetensors"))
        except Exception as e:  # noqa: BLE001
            raise TrainError(f"{cache}: not a readable token cache ({type(e).__name__}); delete it to rebuild") from None
        self.entries = index["tracks"]
        ids = range(len(self.entries)) if tracks is None else tracks
        self.items = []
        for i in ids:
            e = self.entries[i]
            self.items.append({**e, "codes": arrays[f"{i}.codes"].long(), "rms": arrays[f"{i}.rms"].numpy(),
                               "subset_index": {tuple(s): j for j, s in enumerate(e["subsets"])},
                               "contexts_of": [[tuple(c) for c in e["subsets"] if t not in c]
                                               for t in range(len(e["classes"]))]})

    def classes(self) -> list[str]:
        return sorted({c for e in self.entries for c in e["classes"]})


class PairSampler:
    """SPEC 5 pairs: a target stem, a context = mix of a random non-empty subset of the other
    stems (uniform over the subsets the cache holds), a random crop of ``frames``; pairs whose context or target is silent over the crop are
    redrawn. Returns tokens [B, 2, Q, T] (context, target) and instrument ids [B]."""

    def __init__(self, corpus: TokenCorpus, instruments: list[str], frames: int, silence_rms: float = 1e-3):
        self.corpus = corpus
        self.index = {instrument_name(name): i for i, name in enumerate(instruments)}
        self.frames = frames
        self.silence_rms = silence_rms
        self.targets = [(k, s) for k, e in enumerate(corpus.items) for s, c in enumerate(e["classes"])
                        if e["contexts_of"][s] and instrument_name(c) in self.index]
        if not self.targets:
            raise TrainError("no track has a target stem of a known instrument and another stem as context")

    def sample(self, batch: int, rng: np.random.Generator, targets: list[tuple[int, int]] | None = None):
        toks, inst = [], []
        for b in range(batch):
            for _ in range(100):
                k, s = self.targets[int(rng.integers(len(self.targets)))] if targets is None else targets[b]
                e = self.corpus.items[k]
                contexts = e["contexts_of"][s]
                pick = contexts[int(rng.integers(len(contexts)))]
                T = e["frames"]
                L = min(self.frames, T)
                start = int(rng.integers(0, T - L + 1))
                ci, ti = e["subset_index"][pick], e["subset_index"][(s,)]
                if (e["rms"][ci, start:start + L].mean() > self.silence_rms
                        and e["rms"][ti, start:start + L].mean() > self.silence_rms):
                    break
            pair = torch.stack([e["codes"][ci, :, start:start + L], e["codes"][ti, :, start:start + L]])
            if L < self.frames:  # only when a track is shorter than the crop: repeat to fill
                reps = -(-self.frames // L)
                pair = pair.repeat(1, 1, reps)[..., :self.frames]
            toks.append(pair)
            inst.append(self.index[instrument_name(e["classes"][s])])
        return torch.stack(toks), torch.tensor(inst)
