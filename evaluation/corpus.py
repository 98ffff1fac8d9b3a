"""Toy-band corpus: procedural multi-stem songs with known tempo, meter, key and chords, rendered
by simple synthesis and written in the Slakh2100 layout:

    TrackNNNNN/mix.wav
    TrackNNNNN/stems/S00.wav ... S03.wav        drums, bass, chords (pad), lead
    TrackNNNNN/metadata.yaml                    per stem: inst_class, program_num, is_drum, midi notes;
                                                ground truth: tempo, meter, key, chords per bar

Deterministic by seed. Songs are built from note events, so variants (transposed, shifted) can be
rendered from the same song.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.fileutil import atomic_dir

PITCH_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
MAJOR = [0, 2, 4, 5, 7, 9, 11]
MINOR = [0, 2, 3, 5, 7, 8, 10]
# diatonic progressions (scale degrees, 0-based), each starting on the tonic
PROGRESSIONS = {"major": [[0, 4, 5, 3], [0, 3, 4, 4], [0, 5, 3, 4], [0, 3, 0, 4]],
                "minor": [[0, 5, 2, 6], [0, 3, 4, 0], [0, 5, 3, 4], [0, 6, 5, 4]]}
STEMS = [  # stem id, inst_class (Slakh), GM program, is_drum
    ("S00", "Drums", 0, True), ("S01", "Bass", 33, False), ("S02", "Synth Pad", 89, False),
    ("S03", "Synth Lead", 80, False)]


@dataclass
class Note:
    start: float  # seconds
    dur: float
    pitch: int    # MIDI (drums: 36 kick, 38 snare, 42 hat)
    vel: float


@dataclass
class Song:
    tempo: float
    beats_per_bar: int
    tonic: int
    mode: str
    chords: list[tuple[int, str]]   # per bar: (root pitch class, "maj"/"min")
    notes: dict[str, list[Note]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{PITCH_NAMES[self.tonic]} {self.mode}"

    @property
    def bar_s(self) -> float:
        return self.beats_per_bar * 60.0 / self.tempo

    @property
    def duration(self) -> float:
        return len(self.chords) * self.bar_s


def chord_name(root: int, quality: str) -> str:
    return PITCH_NAMES[root] + ("m" if quality == "min" else "")


def make_song(rng: np.random.Generator, bars: int = 8) -> Song:
    tempo = float(rng.integers(90, 151))
    bpb = int(rng.choice([3, 4], p=[0.3, 0.7]))
    tonic = int(rng.integers(0, 12))
    mode = str(rng.choice(["major", "minor"]))
    scale = MAJOR if mode == "major" else MINOR
    prog = PROGRESSIONS[mode][int(rng.integers(0, 4))]
    chords = []
    for i in range(bars):
        deg = prog[i % len(prog)]
        root = (tonic + scale[deg]) % 12
        third = (scale[(deg + 2) % 7] - scale[deg]) % 12
        chords.append((root, "maj" if third == 4 else "min"))
    song = Song(tempo, bpb, tonic, mode, chords)
    beat = 60.0 / tempo
    drums, bass, pad, lead = [], [], [], []
    for b, (root, qual) in enumerate(chords):
        t0 = b * song.bar_s
        for k in range(bpb):  # kick on the downbeat (accented), snare on the back beats, hats on eighths
            t = t0 + k * beat
            if k == 0:
                drums.append(Note(t, 0.15, 36, 1.0))
            elif bpb == 4 and k == 2:
                drums.append(Note(t, 0.15, 36, 0.7))
            else:
                drums.append(Note(t, 0.12, 38, 0.6))
            drums += [Note(t, 0.05, 42, 0.3), Note(t + beat / 2, 0.05, 42, 0.2)]
            bass.append(Note(t, beat * 0.9, 36 + root if root < 8 else 24 + root, 0.8 if k == 0 else 0.6))
        tones = [root, (root + (4 if qual == "maj" else 3)) % 12, (root + 7) % 12]
        for pc in tones:
            pad.append(Note(t0, song.bar_s * 0.98, 60 + pc, 0.35))
        for k in range(bpb * 2):  # lead: eighths drawn from the chord tones and the scale
            if rng.random() < 0.3:
                continue
            pool = tones * 2 + [(tonic + s) % 12 for s in scale]
            pc = int(rng.choice(pool))
            lead.append(Note(t0 + k * beat / 2, beat * 0.45, 72 + pc, 0.4))
    song.notes = {"S00": drums, "S01": bass, "S02": pad, "S03": lead}
    return song


def _hz(pitch: float) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


def render_stem(notes: list[Note], stem: str, duration: float, sr: int, rng: np.random.Generator,
                transpose: int = 0, shift: float = 0.0) -> np.ndarray:
    """Synthesise one stem [N] (transpose: semitones for pitched stems; shift: seconds of delay)."""
    out = np.zeros(int(round(duration * sr)) + 1, dtype=np.float64)
    for n in notes:
        start = int(round((n.start + shift) * sr))
        if start >= len(out):
            continue
        L = min(int(n.dur * sr), len(out) - start)
        t = np.arange(L) / sr
        if stem == "S00":
            if n.pitch == 36:    # kick: falling sine
                f = 50 + 100 * np.exp(-t * 30)
                x = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t * 18)
            elif n.pitch == 38:  # snare: noise + tone
                x = (rng.standard_normal(L) * 0.7 + np.sin(2 * np.pi * 190 * t) * 0.3) * np.exp(-t * 25)
            else:                # hat: high-passed noise
                x = np.diff(rng.standard_normal(L + 1)) * 0.5 * np.exp(-t * 80)
        else:
            f = _hz(n.pitch + transpose)
            env = np.minimum(1.0, t / 0.01) * np.exp(-t * (1.5 if stem == "S02" else 4.0))
            env *= np.minimum(1.0, (L / sr - t) / 0.02).clip(0)
            if stem == "S01":    # bass: a few harmonics
                x = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3))
            elif stem == "S02":  # pad: soft triangle-ish
                x = sum(np.sin(2 * np.pi * f * h * t) / h ** 2 for h in (1, 3, 5))
            else:                # lead: brighter
                x = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3, 4))
            x = x * env
        out[start:start + L] += n.vel * x
    return out.astype(np.float32)


def render_song(song: Song, sr: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gains = {"S00": 0.5, "S01": 0.35, "S02": 0.2, "S03": 0.2}
    return {s: gains[s] * render_stem(song.notes[s], s, song.duration, sr, rng) for s in song.notes}


def metadata(song: Song, sr: int) -> dict:
    return {
        "audio_dir": "stems", "sample_rate": sr, "toy_band": True,
        "ground_truth": {"tempo": song.tempo, "beats_per_bar": song.beats_per_bar, "key": song.key,
                         "tonic": song.tonic, "mode": song.mode, "bar_seconds": song.bar_s,
                         "chords": [chord_name(r, q) for r, q in song.chords]},
        "stems": {sid: {"inst_class": cls, "program_num": prog, "is_drum": drum, "audio_rendered": True,
                        "notes": [[round(n.start, 5), round(n.dur, 5), n.pitch, round(n.vel, 3)]
                                  for n in song.notes[sid]]}
                  for sid, cls, prog, drum in STEMS},
    }


def make_corpus(out: str | Path, songs: int, seed: int = 0, sr: int = 44100, progress=None) -> Path:
    """Write ``songs`` tracks under ``out`` (created; must not exist or be empty)."""
    import soundfile as sf
    import yaml

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new folder")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: parent folder does not exist")
    if songs < 1:
        raise ValueError("--songs must be >= 1")
    with atomic_dir(out) as tmp:
        for i in range(songs):
            rng = np.random.default_rng([seed, i])
            song = make_song(rng)
            stems = render_song(song, sr, seed=int(rng.integers(1 << 31)))
            track = tmp / f"Track{i + 1:05d}"
            (track / "stems").mkdir(parents=True)
            for sid, x in stems.items():
                sf.write(track / "stems" / f"{sid}.wav", x, sr, subtype="PCM_16")
            mix = sum(stems.values())
            sf.write(track / "mix.wav", mix / max(1.0, float(np.abs(mix).max()) / 0.99), sr, subtype="PCM_16")
            (track / "metadata.yaml").write_text(yaml.safe_dump(metadata(song, sr), sort_keys=False))
            if progress:
                progress(i + 1, songs)
    return out


def song_from_metadata(meta: dict) -> Song:
    """Rebuild a toy-band Song (notes included) from its metadata.yaml."""
    gt = meta["ground_truth"]
    chords = []
    for name in gt["chords"]:
        q = "min" if name.endswith("m") else "maj"
        chords.append((PITCH_NAMES.index(name[:-1] if q == "min" else name), q))
    song = Song(gt["tempo"], gt["beats_per_bar"], gt["tonic"], gt["mode"], chords)
    song.notes = {sid: [Note(*n) for n in s["notes"]] for sid, s in meta["stems"].items()}
    return song


def load_track(track: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, int]]]:
    """Read one Slakh2100-layout track: (metadata, {stem id: (mono audio, sr)}) for rendered stems.
    Works for real Slakh2100 tracks (flac stems) and toy-band tracks alike."""
    from ..engine.audio import read_audio
    from ..train.data import read_metadata

    track = Path(track)
    meta_path = track / "metadata.yaml"
    if not meta_path.is_file():
        raise ValueError(f"{track}: no metadata.yaml (not a Slakh2100-layout track)")
    meta, audio_dir, listed = read_metadata(track)   # untrusted: size, YAML tags, types checked
    stems = {}
    for sid, _, rendered in listed:
        if not rendered:
            continue
        for ext in (".wav", ".flac"):
            p = audio_dir / f"{sid}{ext}"
            if p.is_file():
                audio, sr = read_audio(p)
                stems[sid] = (audio.mean(axis=0), sr)
                break
    return meta, stems


def context_and_stem(track: str | Path, inst_class: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(context = sum of the other stems, the first stem of ``inst_class``, sr), or None if the
    track has no such stem."""
    meta, stems = load_track(track)
    fold = lambda name: str(name).strip().lower().replace("_", " ")  # noqa: E731 ('bass' matches 'Bass')
    target = next((sid for sid, info in meta["stems"].items()
                   if fold(info.get("inst_class")) == fold(inst_class) and sid in stems), None)
    if target is None:
        return None
    sr = stems[target][1]
    n = max(len(a) for a, _ in stems.values())
    ctx = np.zeros(n, dtype=np.float32)
    for sid, (a, _) in stems.items():
        if sid != target:
            ctx[:len(a)] += a
    stem = np.zeros(n, dtype=np.float32)
    stem[:len(stems[target][0])] = stems[target][0]
    return ctx, stem, sr


def export_pairs(corpus: str | Path, inst_class: str, out: str | Path, progress=None) -> int:
    """For every track of a Slakh2100-layout corpus with a stem of ``inst_class``, write
    ``out/context/<track>.wav`` (the other stems summed) and ``out/stem/<track>.wav`` (the stem):
    the contexts to generate for, and the references for `stemgen eval --context`."""
    import soundfile as sf

    corpus, out = Path(corpus), Path(out)
    tracks = sorted(p for p in corpus.iterdir() if (p / "metadata.yaml").is_file()) if corpus.is_dir() else []
    if not tracks:
        raise ValueError(f"{corpus}: no Slakh2100-layout tracks (folders with metadata.yaml)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new folder")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: parent folder does not exist")
    n = 0
    with atomic_dir(out) as tmp:
        (tmp / "context").mkdir()
        (tmp / "stem").mkdir()
        for i, track in enumerate(tracks):
            pair = context_and_stem(track, inst_class)
            if pair is not None:
                ctx, stem, sr = pair
                sf.write(tmp / "context" / f"{track.name}.wav", ctx, sr, subtype="FLOAT")
                sf.write(tmp / "stem" / f"{track.name}.wav", stem, sr, subtype="FLOAT")
                n += 1
            if progress:
                progress(i + 1, len(tracks))
        if n == 0:
            raise ValueError(f"{corpus}: no track has a stem of inst_class {inst_class!r}")
    return n
