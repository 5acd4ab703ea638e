"""The time a call spends outside its engine (the router, Serve's handle, the replica's event loop and vLLM's
front end), fitted from the committed runs that measured both sides: the router's mean time of each kind of
call (``call_ms_mean``) less the engine's own queued and running time of it (``engines.<pool>.calls``). It
grows with the calls open at the replica (they share its event loop); their number comes from Little's law
(the level's steady throughput times the time a request spends in that pool's calls, per replica). One more
point per kind, one call open: a glimpse through Serve costs 7 ms more than in process and a step the same
(``docs/benchmarks.md``, fifth run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.ops.planner.profiles import PROFILE_DIR, nonnegative_lstsq, result_files
from cluster.ops.planner.runs import GPU_DOCS, facts_for
from cluster.ops.planner.system import CallCost, Overheads

OVERHEADS_FILE = PROFILE_DIR / "overheads" / "router-path.json"
ONE_OPEN = {"glimpse": 7.0, "small": 0.0, "large": 0.0}


def relative(path: Path) -> str:
    return str(path.resolve().relative_to(GPU_DOCS.parent.parent))


def overhead_points(
    docs: Path = GPU_DOCS, exclude: frozenset[str] = frozenset()
) -> dict[str, list[tuple[float, float, str]]]:
    """(calls open at the replica, ms outside the engine, file) by call kind."""
    points: dict[str, list] = {kind: [(1.0, ms, "docs/benchmarks.md")] for kind, ms in ONE_OPEN.items()}
    for path in result_files(docs, exclude=exclude):
        result = json.loads(path.read_text())
        if not facts_for(path, result).fit_overheads:
            continue
        steps = result["steps"]
        for level in result["levels"]:
            engines, calls = level.get("engines"), level.get("call_ms_mean")
            if not isinstance(engines, dict) or not calls or not level.get("steady_rps"):
                continue
            f, rps = level["large_fraction"], level["steady_rps"]
            replicas = {"small": 1, "large": 1} if result["layout"] == "routed-2gpu" else {"large": 2}
            if "small" in engines and "glimpse" in calls and "calls" in engines["small"]:
                in_small = steps * calls["glimpse"] + steps * (1 - f) * calls["small_step"]
                open_small = rps * in_small / 1e3 / replicas["small"]
                for kind, call in (("glimpse", "glimpse"), ("small", "generate")):
                    engine = engines["small"]["calls"][call]["ms"]
                    ms = calls["glimpse" if kind == "glimpse" else "small_step"] - engine["queued"] - engine["running"]
                    points[kind].append((open_small, ms, relative(path)))
            if "large_step" in calls and "calls" in engines.get("large", {}):
                engine = engines["large"]["calls"]["generate"]["ms"]
                open_large = rps * steps * f * calls["large_step"] / 1e3 / replicas["large"]
                ms = max(calls["large_step"] - engine["queued"] - engine["running"], engine["outside"])
                points["large"].append((open_large, ms, relative(path)))
    return points


def fit_overheads(docs: Path = GPU_DOCS, exclude: frozenset[str] = frozenset()) -> dict:
    fitted = {}
    for kind, pts in overhead_points(docs, exclude).items():
        x = np.array([[1.0, p[0]] for p in pts])
        y = np.array([p[1] for p in pts])
        base, per_open = nonnegative_lstsq(x, y)
        fitted[kind] = {
            "base_ms": round(float(base), 3),
            "per_open_ms": round(float(per_open), 4),
            "points": [[round(p[0], 2), round(p[1], 1), p[2]] for p in pts],
        }
    return fitted


def write_overheads(path: Path = OVERHEADS_FILE, docs: Path = GPU_DOCS) -> dict:
    fitted = fit_overheads(docs)
    data = {
        "host": "the 2 x H100 80GB host of the ninth run (32 CPU cores), router with 4 replicas",
        "formula": "ms outside the engine = base_ms + per_open_ms * calls open at the replica",
        **fitted,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def as_overheads(data: dict) -> Overheads:
    cost = {kind: CallCost(data[kind]["base_ms"], data[kind]["per_open_ms"]) for kind in ONE_OPEN}
    return Overheads(glimpse=cost["glimpse"], small_step=cost["small"], large_step=cost["large"])


def load_overheads(path: Path = OVERHEADS_FILE) -> Overheads:
    """The fitted overheads (the defaults of ``Overheads`` where no file was written)."""
    return as_overheads(json.loads(path.read_text())) if path.exists() else Overheads()
