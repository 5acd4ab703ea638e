"""Result files: saving them, plotting curves, and comparing routed files against a baseline (at equal requests
in flight and at equal p95)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def save(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}", flush=True)


def plot(args) -> None:
    """Throughput (steady dashed) and p95 latency against requests in flight, one line per ``setup`` and arm: the
    files of one setup pooled (several starts), levels at the same number in flight averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict]] = {}
    for path in args.files:
        data = json.loads(Path(path).read_text())
        for arm, levels in by_arm(data["levels"]).items():
            curves.setdefault(f"{setup(data)} ({arm})", []).extend(levels)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        points = by_in_flight(curve)
        x = [n for n, _ in points]
        (line,) = ax1.plot(x, [mean_of(levels, "throughput_rps") for _, levels in points], marker="o", label=label)
        if None not in (steady := [mean_of(levels, "steady_rps") for _, levels in points]):
            ax1.plot(x, steady, marker="x", linestyle="--", color=line.get_color(), label=f"{label}, steady")
        ax2.plot(x, [mean_of(levels, "p95_s") for _, levels in points], marker="o", label=label)
    ax1.set(xlabel="requests in flight", ylabel="requests/s", title="throughput")
    ax2.set(xlabel="requests in flight", ylabel="seconds", title="p95 request latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    # one legend for both panels, below them (a line's p95 has its throughput line's colour)
    fig.legend(*ax1.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0), fontsize="small")
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")


def setup(result: dict) -> str:
    """What a result file ran: its layout, steps a request, MPS and ``--set`` overrides (older files lack the last)."""
    overrides = [f"{path}={value}" for path, value in (result.get("overrides") or {}).items()]
    mps = ["MPS"] if result.get("mps") else []
    return ", ".join([result["layout"], f"{result['steps']} steps", *mps, *overrides])


def by_arm(levels: list[dict]) -> dict[str, list[dict]]:
    """A result file's levels grouped by client arm, in order of first appearance (files without arms: stream)."""
    arms: dict[str, list[dict]] = {}
    for level in levels:
        arms.setdefault(level.get("arm", "stream"), []).append(level)
    return arms


def by_in_flight(curve: list[dict]) -> list[tuple[int, list[dict]]]:
    """A curve's levels grouped by requests in flight, in order (several starts' levels at one number together)."""
    groups: dict[int, list[dict]] = {}
    for level in curve:
        groups.setdefault(level["concurrency"], []).append(level)
    return sorted(groups.items())


def at_equal_p95(curve: list[dict], p95_s: float, key: str) -> float | None:
    """The throughput ``key`` of a curve (levels of one arm, those at the same number in flight averaged) where its
    p95 latency is ``p95_s``: linear between neighbouring points whose p95s enclose it; None outside the curve."""
    points = [(mean_of(levels, "p95_s"), mean_of(levels, key)) for _, levels in by_in_flight(curve)]
    for (p1, t1), (p2, t2) in zip(points, points[1:] or points, strict=False):  # a one-point curve: only at its own p95
        if min(p1, p2) <= p95_s <= max(p1, p2) and None not in (t1, t2):
            return t1 if p1 == p2 else t1 + (t2 - t1) * (p95_s - p1) / (p2 - p1)
    return None


def mean_of(levels: list[dict], key: str) -> float | None:
    """The mean of ``key`` over ``levels``; None when there are none or one lacks it (older result files)."""
    values = [lv.get(key) for lv in levels]
    return statistics.fmean(values) if values and None not in values else None


def comparisons(routed: dict, baseline: dict) -> list[dict]:
    """Each arm of a routed result file against a baseline file (levels at the same number in flight averaged):
    throughput ratios, over the level and steady, at equal requests in flight and at the baseline's p95."""
    rows = []
    for arm, curve in by_arm(routed["levels"]).items():
        routed_at = dict(by_in_flight(curve))
        for n, base in by_in_flight(baseline["levels"]):
            same = routed_at.get(n, [])
            p95_s = mean_of(base, "p95_s")
            row = {"arm": arm, "in_flight": n, "p95_s": mean_of(same, "p95_s"), "baseline_p95_s": p95_s}
            for key in ("throughput_rps", "steady_rps"):
                if (reference := mean_of(base, key)) is None:
                    continue
                row[f"{key}_ratio"] = None if (equal := mean_of(same, key)) is None else equal / reference
                row[f"{key}_ratio_at_equal_p95"] = (
                    None if (at := at_equal_p95(curve, p95_s, key)) is None else at / reference
                )
            rows.append({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
    return rows


def merged(paths: list[str]) -> dict:
    """Result files of one ``setup`` (e.g. several starts) as one, their levels together."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    if len(setups := {setup(f) for f in files}) > 1:
        raise SystemExit(f"gpu_bench compare: the files ran different setups: {'; '.join(sorted(setups))}")
    return {**files[0], "levels": [level for f in files for level in f["levels"]]}


def compare(args) -> None:
    """Print ``comparisons`` of routed result files against baseline ones, one JSON line each."""
    routed, baseline = merged(args.routed), merged(args.baseline)
    print(f"{setup(routed)} against {setup(baseline)}")
    for row in comparisons(routed, baseline):
        print(json.dumps(row))
