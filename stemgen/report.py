"""`stemgen bench-report`: benchmark JSON files -> one Markdown page (bench/RESULTS.md).

Reads the two kinds of JSON the project writes: `stemgen bench --json` (whole generations, engine
vs baseline) and pytest-benchmark's `--benchmark-json` (kernels and C++ ops vs their references,
grouped). Every figure on the page comes from a file; the page names each file, its machine and
its device."""
from __future__ import annotations

import json
from pathlib import Path

from .engine.fileutil import atomic_write_text

from .bench import rate, result_rows

FAST_IMPLS = ("triton", "cpp", "engine")


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not ({"results", "settings"} <= data.keys() or "benchmarks" in data):
        raise ValueError(f"{path}: neither a `stemgen bench --json` report nor a pytest-benchmark --benchmark-json "
                         "file")
    return data


def _table(header: list[str], rows: list[list[str]], text_cols: int = 2) -> list[str]:
    align = ["---"] * text_cols + ["---:"] * (len(header) - text_cols)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_generation(name: str, rep: dict) -> list[str]:
    m, s = rep["machine"], rep["settings"]
    has_base = any("baseline" in r for r in rep["results"])
    base = f"baseline {s['baseline_dtype']} training-form model" if has_base else "no baseline run"
    where = m.get("gpu") or f"{m['processor']}, {m['cpu_threads']} threads" + (
        f" ({m['cpu_features']})" if m.get("cpu_features") else "")
    lines = [f"### {name}: whole generations (`stemgen bench`)", "",
             f"Device: **{where}** ({m['device']}); torch {m['torch']}, Python {m['python']}.",
             f"Model {s['model']}, {s['parameters'] / 1e6:.1f}M parameters; {s['duration_s']:.1f} s "
             f"({s['frames']} frames); steps {s['steps']}; guidance {s['guidance']}; engine {s['engine_dtype']}"
             f"{' with CUDA graphs' if s.get('cuda_graphs') else ''}; {base}"
             + (f"; attention configuration STEMGEN_FLASH_CONFIG={m['flash_config']}" if m.get("flash_config") else "")
             + ".", ""]
    rows = []
    for r, run, x in result_rows(rep):
        ratio = f"**{r['speedup_frames_per_s']:.2f}x**" if run == "engine" and "baseline" in r else ""
        agree = f"{100 * r['token_agreement']:.1f}%" if run == "engine" and "token_agreement" in r else ""
        rows.append([str(r["batch"]), run, f"{x['wall_s']:.3f}", f"{x['step_latency_ms']:.2f}",
                     rate(x['frames_per_s']), rate(x['audio_s_per_wall_s']), f"{x['peak_mb']:.0f}", ratio, agree])
    lines += _table(["batch", "run", "wall s", "step ms", "frames/s", "audio s per s", "peak MB", "ratio",
                     "tokens equal to baseline's"], rows)
    if has_base and s["engine_dtype"] != s["baseline_dtype"]:
        lines += ["", f"({s['engine_dtype']} engine vs {s['baseline_dtype']} baseline: rounding changes some "
                      "sampled tokens, so token agreement is below 100% by design; the fp32 run shows parity.)"]
    sat = rep.get("saturation")
    if sat:
        lines += ["", f"Throughput saturates at batch **{sat['batch']}** ({sat['frames_per_s']:.0f} frames/s, "
                      f"best {sat['best_frames_per_s']:.0f})" + ("." if sat["reached"] else
                                                                  ": not reached, larger batches may still gain.")]
    return lines + [""]


def _test_id_impl(name: str) -> str:
    """'test_attention[1000-3-triton]' -> 'triton': the implementation is the id's last part (an
    op's function is a parameter pytest-benchmark cannot write into its JSON)."""
    return name.rsplit("[", 1)[-1].rstrip("]").rsplit("-", 1)[-1] if name.endswith("]") else name


def render_pytest_benchmark(name: str, data: dict) -> list[str]:
    """Per group: each implementation's mean, and the fast one's speedup over each other one."""
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw") or mi.get("processor", "?")
    gpu = mi.get("gpu") or ""   # added by bench/conftest.py on a CUDA machine
    lines = [f"### {name}: ops (pytest-benchmark)", "",
             f"Machine: **{gpu or cpu}**" + (f" (host CPU {cpu})" if gpu else "") +
             f"; Python {mi.get('python_version', '?')}; {data.get('datetime', '')[:10]}.", ""]
    groups: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        impl = str((b.get("params") or {}).get("impl") or _test_id_impl(b["name"]))
        groups.setdefault(b.get("group") or b["name"], {})[impl] = b["stats"]["mean"]
    rows = []
    for group, impls in groups.items():
        fast = next((i for i in FAST_IMPLS if i in impls), None)
        for impl, mean in impls.items():
            ratio = "" if fast is None or impl == fast else f"{mean / impls[fast]:.2f}x"
            rows.append([group, impl, f"{mean * 1e3:.3f}", ratio])
    lines += _table(["group", "impl", "mean ms", "fast impl's speedup over this one"], rows)
    return lines + [""]


def render(paths: list[Path], title: str = "Benchmark results") -> str:
    lines = [f"# {title}", "", "Generated by `stemgen bench-report` from the JSON files named below (each in "
             "this folder); rerun it after new measurements. Ratios are baseline time / fast time, both "
             "measured in the same process.", ""]
    for p in paths:
        data = load(p)
        lines += (render_pytest_benchmark if "benchmarks" in data else render_generation)(Path(p).name, data)
    return "\n".join(lines).rstrip() + "\n"


def write(paths: list[Path], out: Path, title: str = "Benchmark results") -> None:
    atomic_write_text(out, render(paths, title))
