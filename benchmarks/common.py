"""Shared benchmark plumbing: CUDA-event timing, environment record, table + JSON output.

Every benchmark times with CUDA events after warm-up and reports the median; results go to
benchmarks/results/<name>_<gpu>_<date>[_runN].json with the GPU, driver, versions and commit.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn()` over `iters` runs, each timed with its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fn, calls: int = 5, replays: int = 5) -> float:
    """Milliseconds per call of `fn`, replayed from a CUDA graph of `calls` calls.

    Event timing of single eager calls would include the Python launch path (custom-op dispatch,
    autotuner lookup: tens of µs), which is as long as the 0.1 ms kernels themselves; the DiT runs
    these under CUDA graphs / torch.compile, so the graph time is the one that matters.
    """
    fn()                                                   # autotune and compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_cuda(graph.replay, warmup=1, iters=replays) / calls


def _git_commit() -> str:
    # The device gets a copy of the tree without .git: the caller passes the commit in TURBOVID_COMMIT.
    if os.environ.get("TURBOVID_COMMIT"):
        return os.environ["TURBOVID_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "commit": _git_commit(),
            "date": datetime.date.today().isoformat()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            info["driver"] = None
    return info


def gpu_tag() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for tag in ("H100", "H200", "A100", "L40", "4090", "5090"):
        if tag in name:
            return tag.lower()
    return name.split()[-1].lower()


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


_PATHS: dict[tuple[str, Path], Path] = {}   # the file each (name, folder) of this process writes


def results_path(name: str, out_dir: Path, date: str) -> Path:
    """<out_dir>/<name>_<gpu>_<date>.json, or _run2, _run3, ... when an earlier process left that file: a second
    benchmark in the same folder (or the same one again) never overwrites a result. Chosen once per process, so a
    benchmark that saves after every row keeps rewriting its own file."""
    key = (name, out_dir.resolve())
    if key not in _PATHS:
        stem, run = f"{name}_{gpu_tag()}_{date}", 1
        path = out_dir / f"{stem}.json"
        while path.exists():
            run += 1
            path = out_dir / f"{stem}_run{run}.json"
        _PATHS[key] = path
    return _PATHS[key]


def write_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write {"env": ..., **payload} to `results_path` in <out_dir or results>; return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    env = env_info()
    path = results_path(name, out_dir, env["date"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, **payload}, indent=1))
    tmp.replace(path)
    # One machine-readable line beside the human table.
    print(json.dumps({"bench": name, "json": str(path)}))
    return path
