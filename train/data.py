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
import re
from pathlib import Path

import numpy as np
import torch

from .loop import TrainError

CACHE_VERSION = 1
MAX_STEMS = 6   # subsets are enumerated: at most 2**MAX_STEMS - 1 mixes per track
MAX_METADATA_BYTES = 4 << 20   # a Slakh2100 metadata.yaml is a few KB, a toy-band one (with notes) ~50 KB
MAX_LISTED_STEMS = 256         # stems a metadata.yaml may list (rendered or not)
_STEM_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")


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


def _show(v) -> str:
    """A value from an untrusted file, for an error line: short, one line, control characters escaped
    (never expanded whole: engine.schema's bounded form)."""
    from ..engine.schema import _show as show
    return show(v, 60)


def read_metadata(track: str | Path) -> tuple[dict, Path, list[tuple[str, str, bool]]]:
    """A track's ``metadata.yaml``, untrusted: bounded size, YAML without tags beyond the safe ones,
    the fields the corpus readers use checked for type. -> (the document, audio folder inside the
    track, [(stem id, inst_class, audio_rendered)]). Any problem is one TrainError line."""
    import yaml

    track = Path(track)
    path = track / "metadata.yaml"
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise TrainError(f"{path}: {size} bytes; a metadata.yaml has at most {MAX_METADATA_BYTES}")
        meta = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except TrainError:
        raise
    except (yaml.YAMLError, RecursionError, ValueError) as e:   # ValueError: UnicodeDecodeError, huge ints
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"{path}: not a readable metadata.yaml ({type(e).__name__}: {first[:120]})") from None
    except OSError as e:
        raise TrainError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise TrainError(f"{path}: must be a YAML mapping, got {type(meta).__name__}")
    stems = meta.get("stems")
    if not isinstance(stems, dict) or not stems:
        raise TrainError(f"{path}: 'stems' must be a non-empty mapping of stem ids, got {type(stems).__name__}")
    if len(stems) > MAX_LISTED_STEMS:
        raise TrainError(f"{path}: {len(stems)} stems listed; at most {MAX_LISTED_STEMS}")
    audio_dir = meta.get("audio_dir", "stems")
    if (not isinstance(audio_dir, str) or not audio_dir or len(audio_dir) > 255 or "\0" in audio_dir
            or Path(audio_dir).is_absolute() or ".." in Path(audio_dir).parts):
        raise TrainError(f"{path}: audio_dir {_show(audio_dir)} must be a folder inside the track")
    out = []
    for sid, info in stems.items():
        if isinstance(sid, bool) or not isinstance(sid, (str, int)) or not _STEM_ID.fullmatch(str(sid)):
            raise TrainError(f"{path}: stem id {_show(sid)} must be a plain name such as S00")
        if not isinstance(info, dict):
            raise TrainError(f"{path}: stems.{sid} must be a mapping, got {type(info).__name__}")
        cls, rendered = info.get("inst_class", "unknown"), info.get("audio_rendered", True)
        if not isinstance(cls, str) or not cls.strip() or len(cls) > 64 or not cls.isprintable():
            raise TrainError(f"{path}: stems.{sid}.inst_class {_show(cls)} must be a printable name of "
                             "1-64 characters")
        if not isinstance(rendered, bool):
            raise TrainError(f"{path}: stems.{sid}.audio_rendered must be true or false, got {_show(rendered)}")
        out.append((str(sid), cls, rendered))
    if len({sid for sid, _, _ in out}) != len(out):
        raise TrainError(f"{path}: two stems share an id")
    return {**meta, "stems": {str(k): v for k, v in stems.items()}}, track / audio_dir, out


def read_track(track: Path, sr: int, max_stems: int | None = None) -> tuple[list[str], np.ndarray]:
    """-> (inst_class per stem, stems [S, N] mono float32 at ``sr``). Audio through the engine's
    reader: the header's rate, channels and length within the limits of `stemgen generate`
    (engine/audio.py) before a sample is read; NaN, empty or unreadable files are one line."""
    import soxr

    from ..engine.audio import read_audio
    from ..engine.errors import StemGenError

    _, audio_dir, stems = read_metadata(track)
    found = []
    for sid, cls, rendered in stems:
        path = next((audio_dir / f"{sid}{ext}" for ext in (".wav", ".flac") if (audio_dir / f"{sid}{ext}").is_file()),
                    None)
        if rendered and path is not None:
            found.append((cls, path))
    if not found:
        raise TrainError(f"{track}: no rendered stems found")
    if max_stems is not None and len(found) > max_stems:
        raise TrainError(f"{track}: {len(found)} stems; at most {max_stems} per track are supported")
    classes, waves = [], []
    for cls, path in found:
        try:
            x, file_sr = read_audio(path)
        except StemGenError as e:
            raise TrainError(str(e)) from None
        x = x.mean(axis=0)
        if file_sr != sr:
            x = soxr.resample(x, file_sr, sr).astype(np.float32)
        classes.append(cls)
        waves.append(x)
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
        classes, stems = read_track(track, sr, max_stems=MAX_STEMS)
        T = stems.shape[1] // hop
        if T < 1:
            raise TrainError(f"{track}: shorter than one codec frame ({hop} samples at {sr} Hz)")
        subsets = _subsets(len(classes), contexts)
        mixes = np.stack([stems[list(s)].sum(0) for s in subsets])      # [M, N]
        peak = np.abs(mixes).max(axis=1, keepdims=True)
        mixes = mixes / np.maximum(peak / 0.99, 1.0)                       # no clipping, never louder
        codes = codec.encode(torch.from_numpy(mixes[:, None, :T * hop].copy()))  # [M, Q, T]
        energy = np.sqrt((mixes[:, :T * hop].reshape(len(subsets), T, hop) ** 2).mean(-1))  # [M, T]
        arrays[f"{i}.codes"] = codes.to(torch.int16).contiguous()
        arrays[f"{i}.rms"] = torch.from_numpy(energy.astype(np.float32))
        entries.append({"track": track.name, "classes": classes, "subsets": [list(s) for s in subsets], "frames": T})
        log(f"tokenised {i + 1}/{len(tracks)} {track.name}: {len(subsets)} mixes x {T} frames")
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..engine.fileutil import atomic_file, atomic_write_text, output_error

    try:
        with atomic_file(cache / "tokens.safetensors") as tmp:
            save_file(arrays, str(tmp))
    except SafetensorError as e:
        raise output_error(cache / "tokens.safetensors", e) from None
    atomic_write_text(index_path, json.dumps({"key": key, "tracks": entries}))
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
    redrawn. Returns tokens [B, 2, Q, T] (context, target) and instrument ids [B].
    ``full_prob`` (not SPEC; default 0): that share of the pairs takes every other stem as the
    context (the whole band, what a user usually gives) before the uniform draw over the rest."""

    def __init__(self, corpus: TokenCorpus, instruments: list[str], frames: int, silence_rms: float = 1e-3,
                 full_prob: float = 0.0):
        self.corpus = corpus
        self.full_prob = full_prob
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
                # no draw at 0: runs begun before the option resume with the same pairs
                if self.full_prob > 0 and rng.random() < self.full_prob:
                    pick = max(contexts, key=len)
                else:
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
