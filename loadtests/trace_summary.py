"""Where an engine iteration's time goes, from a torch-profiler trace of the in-process engine core
(``loadtests.engine_sweep``'s ``profile`` phase).

    python -m loadtests.trace_summary TRACE.json[.gz] [--iterations N]

A trace in the Chrome format (``torch.profiler``'s ``export_chrome_trace``) holds, for this process, CPU events
(vLLM's scopes as ``user_annotation``, ATen operators as ``cpu_op``, CUDA API calls as ``cuda_runtime``) and the
GPU's (``kernel``, ``gpu_memcpy``, ``gpu_memset``). Over the window the engine iterations span (the
``ITERATION`` scopes), the summary gives per iteration: the wall time, the time the GPU ran this process's work
(the union of its kernels' and copies' intervals, so overlapping streams count once) and the rest (gaps: the GPU
idle for this process, waiting on the CPU or, when another process shares the GPU, running that one's kernels),
the kernels by name, vLLM's scopes, and the CUDA API calls.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

ITERATION = "sweep: iteration"
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def clipped(event: dict, lo: float, hi: float) -> tuple[float, float] | None:
    start, stop = max(event["ts"], lo), min(event["ts"] + event.get("dur", 0.0), hi)
    return (start, stop) if stop > start else None


def top(totals: dict[str, float], counts: dict[str, int], per: int, n: int) -> list[dict]:
    """The ``n`` largest ``totals`` (microseconds) as milliseconds per iteration with calls per iteration."""
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return [
        {"name": name[:90], "ms": round(us / per / 1e3, 4), "calls": round(counts[name] / per, 2)}
        for name, us in ranked
    ]


def summarize(events: list[dict], n: int = 12) -> dict:
    """The per-iteration figures of one trace's events (see the module's docstring)."""
    marks = [
        e for e in events if e.get("ph") == "X" and e.get("name") == ITERATION and e.get("cat") == "user_annotation"
    ]
    if not marks:
        raise ValueError(f"no {ITERATION!r} scopes in the trace")
    lo, hi = min(e["ts"] for e in marks), max(e["ts"] + e["dur"] for e in marks)
    per = len(marks)
    gpu, kernels, kernel_calls = [], defaultdict(float), defaultdict(int)
    scopes, scope_calls, api, api_calls = defaultdict(float), defaultdict(int), defaultdict(float), defaultdict(int)
    for e in events:
        if e.get("ph") != "X" or (span := clipped(e, lo, hi)) is None:
            continue
        cat, name, length = e.get("cat", ""), e.get("name", ""), span[1] - span[0]
        if cat in GPU_CATEGORIES:
            gpu.append(span)
            kernels[name] += length
            kernel_calls[name] += 1
        elif cat == "user_annotation" and name != ITERATION:
            scopes[name] += length
            scope_calls[name] += 1
        elif cat in ("cuda_runtime", "cuda_driver"):
            api[name] += length
            api_calls[name] += 1
    wall_ms, gpu_ms = (hi - lo) / per / 1e3, union_us(gpu) / per / 1e3
    return {
        "iterations": per,
        "wall_ms_per_iteration": round(wall_ms, 3),
        "gpu_busy_ms_per_iteration": round(gpu_ms, 3),
        "gpu_idle_ms_per_iteration": round(wall_ms - gpu_ms, 3),
        "gpu_busy_fraction": round(gpu_ms / wall_ms, 3) if wall_ms else 0.0,
        "kernels_per_iteration": round(sum(kernel_calls.values()) / per, 1),
        "top_kernels": top(kernels, kernel_calls, per, n),
        "scopes": top(scopes, scope_calls, per, 2 * n),
        "cuda_api": top(api, api_calls, per, 6),
    }


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profiled(driver, load, iterations: int, trace: Path) -> dict:
    """``load`` on ``driver``'s engine, ``iterations`` of it under the torch profiler with vLLM's scopes on: the
    trace written to ``trace`` (gzipped) and its summary."""
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from vllm.v1 import utils as vllm_utils

    prompts = driver.start_decoding(load.seqs, load.context, load.decode)
    prefix = next(iter(prompts.values()))
    arrivals = driver.arrivals(load, prefix)
    driver.timed(10, arrivals)
    step = driver.engine.step

    def marked() -> bool:
        with record_function(ITERATION):
            return step()

    saved, vllm_utils._PROFILER_FUNC = vllm_utils._PROFILER_FUNC, record_function
    driver.engine.step = marked
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            driver.timed(iterations, arrivals)
            torch.cuda.synchronize()
    finally:
        driver.engine.step = step
        vllm_utils._PROFILER_FUNC = saved if saved is not None else contextlib.nullcontext
    driver.drain(prompts)
    trace.parent.mkdir(parents=True, exist_ok=True)
    raw = trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    events = load_trace(raw)
    with open(raw, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        dst.write(src.read())
    raw.unlink()
    return summarize(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(json.dumps(summarize(load_trace(args.trace), args.top), indent=1))


if __name__ == "__main__":
    main()
