"""What each committed GPU run in ``docs/gpu/`` ran on, read from ``docs/benchmarks.md`` (the result files do
not name their card or the code's generation): the card, how ``forced_fraction`` placed the large steps, and
the small engine's CUDA-graph mode unless a file's overrides set it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GPU_DOCS = ROOT / "docs" / "gpu"
H200, H100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
VERSIONS = {"vllm": "0.26.0", "ray": "2.60.0", "torch": "2.11", "python": "3.12"}


@dataclass(frozen=True)
class RunFacts:
    """One run folder's facts (``docs/benchmarks.md`` names them per run)."""

    gpu: str
    phase: str  # "aligned": every request's large steps at the same indexes; "per_request": each its own phase
    small_graphs: str  # "default" (vLLM's FULL_AND_PIECEWISE) or "FULL"
    code: str = "current"  # "before-levers": the 2026-11-25 router, before the levers of the first 2026-11-26 run
    cold_first_level: bool = False  # a start's first level ran right after the engines compiled (no warm-up)
    note: str = ""  # what the model does not describe about every level of the run (its rows carry it)
    fit_overheads: bool = True  # whether its levels feed the router-path fit (a host of its own does not)


RUNS = {  # folder under docs/gpu
    "2026-11-25": RunFacts(H200, "aligned", "default", code="before-levers", cold_first_level=True),
    "2026-11-26": RunFacts(H200, "aligned", "default", cold_first_level=True),
    "2026-11-26-run2": RunFacts(H200, "aligned", "default", cold_first_level=True),
    "2026-11-26-run3": RunFacts(H200, "aligned", "default", cold_first_level=True),
    "2026-11-26-run4": RunFacts(H200, "aligned", "default", cold_first_level=True),
    "2026-11-26-run5": RunFacts(H200, "per_request", "default", cold_first_level=True),
    "2026-11-26-run6": RunFacts(H200, "per_request", "default", cold_first_level=True),
    "2026-11-26-run7": RunFacts(H200, "per_request", "FULL"),
    "2026-11-26-run8": RunFacts(H200, "per_request", "FULL"),
    "2026-11-26-run9": RunFacts(H100, "per_request", "FULL"),
    # one H200 on a 16-core host, both engines on it; the large engine's 24 GiB of KV cache evicted prefixes
    "2026-12-02-run11": RunFacts(H200, "per_request", "FULL", note="large KV cache short", fit_overheads=False),
}
FILE_GPU = {"2026-11-26-run5/single-one-gpu-h100.json": H100}  # that run's other files are from 2 x H200
GRAPH_OVERRIDE = "pools.small.engine.cudagraph_mode"


def run_folder(path: Path) -> str:
    """The ``RUNS`` key of a result file under ``docs/gpu``."""
    rel = path.resolve().relative_to(GPU_DOCS)
    return "." if len(rel.parts) == 1 else rel.parts[0]


def facts_for(path: Path, result: dict) -> RunFacts:
    """The facts of a result file, its overrides applied (a file may set the small engine's graphs)."""
    facts = RUNS.get(run_folder(path))
    if facts is None:
        raise KeyError(f"{path}: its run folder is not in cluster/ops/planner/runs.py RUNS; add its card and settings")
    rel = str(path.resolve().relative_to(GPU_DOCS))
    if rel in FILE_GPU:
        facts = dataclasses.replace(facts, gpu=FILE_GPU[rel])
    mode = (result.get("overrides") or {}).get(GRAPH_OVERRIDE)
    if mode is not None:
        facts = dataclasses.replace(facts, small_graphs="FULL" if mode == "FULL" else "default")
    return facts


def gpu_key(gpu: str) -> str:
    """A short name of a card for file names: ``h200``, ``h100``."""
    return "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.lower().replace(" ", "-")
