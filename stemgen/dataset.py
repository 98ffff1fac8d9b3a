"""`stemgen generate-dataset`: stems for a whole folder (or list) of contexts on Ray.

Ray Data maps batches of items over an actor pool of engines (one per GPU, or per group of CPU
cores); each actor loads the model once and runs its batch through the engine's batched
scheduler, writing every stem atomically. The run is resumable (finished outputs are skipped)
and survives a worker's death (the actor is restarted and its batch retried; a half-written
file is never renamed into place, and at start the temporaries a killed worker left beside the
outputs, named ``.stemgen-<pid>-<output>.<random>.tmp``, are cleared: never anyone else's files).
Without an address Ray runs locally. Ray is an optional extra (`pip install -e '.[cluster]'`); the engine
never imports it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


class EngineWorker:
    """One engine per actor; ``__call__`` generates a batch of items."""

    def __init__(self, model: str, instrument: str, sampling: dict, device: str, dtype: str | None, bits: str):
        from .engine import Engine
        from .engine.config import SamplingConfig

        self.engine = Engine.from_pretrained(model, device=device, dtype=dtype)
        self.instrument, self.bits = instrument, bits
        self.sampling = SamplingConfig.from_dict(sampling)

    def __call__(self, batch: dict) -> dict:
        from .engine.audio import read_audio, write_audio_set

        crash = os.environ.get("STEMGEN_TEST_CRASH_ONCE")
        if crash and not Path(crash).exists():   # tests: this worker dies once, mid-batch
            Path(crash).write_text("crashed")
            os._exit(1)
        handles, status = [], []
        for src in batch["src"]:
            try:
                audio, sr = read_audio(src)
                handles.append(self.engine.submit_audio(audio, self.instrument, sr, sampling=self.sampling))
                status.append(None)
            except ValueError as e:
                handles.append(None)
                status.append(str(e))
        seconds = []
        for i, (h, out) in enumerate(zip(handles, batch["out"])):
            secs = 0.0
            if h is not None:
                try:
                    gen = h.result()
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    write_audio_set([(Path(out), gen.stem, gen.sample_rate)], self.bits)
                    secs = gen.stem.shape[1] / gen.sample_rate
                except ValueError as e:
                    status[i] = str(e)
            seconds.append(secs)
        return {"src": list(batch["src"]), "out": list(batch["out"]), "error": [s or "" for s in status],
                "seconds": seconds}


def generate_dataset(files: list[Path], outs: list[Path], model: str, instrument: str, sampling, *,
                     address: str | None = None, workers: int = 1, cpus_per_worker: int = 1,
                     gpus_per_worker: float = 0, batch_size: int = 8, device: str = "cpu",
                     dtype: str | None = None, bits: str = "16", force: bool = False, log=print,
                     rejected=()) -> dict:
    """``rejected``: [(file, why)] refused before the run (workflows.folder_outputs): reported, counted."""
    import ray

    todo = [(str(f), str(o)) for f, o in zip(files, outs) if force or not o.exists()]
    skipped = len(files) - len(todo)
    summary = {"files": len(files) + len(rejected), "skipped_existing": skipped, "written": 0,
               "failed": len(rejected), "audio_s": 0.0, "failures": [(str(f), why) for f, why in rejected]}
    for _, why in rejected:
        log(why)
    if not todo:
        return {**summary, "wall_s": 0.0}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(os.cpu_count() or 1, workers * cpus_per_worker)}))
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker > gpus:   # the actors would wait forever for them
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has {gpus:g} GPUs")
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"src": s, "out": o} for s, o in todo])
    # Ray Data restarts a dead worker actor and retries its batch by default (tested)
    results = ds.map_batches(
        EngineWorker, fn_constructor_args=(model, instrument, sampling.to_dict(), device, dtype, bits),
        batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker, num_gpus=gpus_per_worker).take_all()
    for row in results:
        if row["error"]:
            summary["failed"] += 1
            summary["failures"].append((row["src"], row["error"]))
            log(f"skipped {row['src']}: {row['error']}")
        else:
            summary["written"] += 1
            summary["audio_s"] += row["seconds"]
    wall = time.perf_counter() - t0
    return {**summary, "wall_s": wall, "audio_s_per_s": summary["audio_s"] / wall if wall else 0.0}
