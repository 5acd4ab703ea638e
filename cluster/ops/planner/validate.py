"""Predicted against measured for every committed load level and single-stream run in ``docs/gpu/``: each
level's layout, arm, requests in flight and request count run through the simulator on the profiles of its
card, and set beside what the run measured (throughput over the level, p50, p95, each pool's busy fraction).

    python -m cluster.ops.planner.validate            # the table (markdown), then the worst errors
    python -m cluster.ops.planner.validate --check docs/planning.md   # exit 1 if the doc's table differs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.ops.planner.overheads import as_overheads, fit_overheads
from cluster.ops.planner.profiles import fit_all
from cluster.ops.planner.runs import GPU_DOCS, H100, facts_for, run_folder
from cluster.ops.planner.simulator import Hardware, simulate
from cluster.ops.planner.system import NAMED, Layout, RequestShape, Routing

BEGIN, END = "<!-- validation table: begin -->", "<!-- validation table: end -->"


@dataclass
class Row:
    run: str
    file: str
    layout: str
    gpu: str
    steps: int
    arm: str
    in_flight: int
    requests: int
    measured: dict
    predicted: dict
    note: str = ""

    def error(self, key: str) -> float | None:
        m, p = self.measured.get(key), self.predicted.get(key)
        return None if m in (None, 0) or p is None else (p - m) / m


def notes(facts, result: dict, level: dict | None, first: bool) -> str:
    out = []
    if facts.code == "before-levers":
        out.append("code before the levers")
    if result.get("mps"):
        out.append("MPS")
    if (
        facts.phase == "aligned"
        and level is not None
        and level.get("arm", "stream") not in ("large", "random")
        and result["layout"] != "large-only-2gpu"
    ):
        out.append("aligned large steps")
    if facts.cold_first_level and first and level is not None:
        out.append("first level after compile")
    if result.get("overrides"):
        out.append(", ".join(f"{k.split('.')[-1]}={v}" for k, v in result["overrides"].items()))
    if facts.note:
        out.append(facts.note)
    return "; ".join(out)


def level_rows(path: Path, seed: int = 0, profiles: dict | None = None, overheads=None) -> list[Row]:
    result = json.loads(path.read_text())
    facts = facts_for(path, result)
    layout = Layout(NAMED[result["layout"]], result["layout"])
    hardware = Hardware(gpu=facts.gpu, small_graphs=facts.small_graphs)
    rows = []
    if "rows" in result:  # single stream: one request at a time, by policy
        for policy in ("routed", "large_only"):
            times = [r["total_s"] for r in result["rows"] if r["policy"] == policy]
            if not times:
                continue
            arm = "large" if policy == "large_only" else "stream"
            shape = RequestShape(steps=result["steps"], arm=arm, routing=Routing(0.25, facts.phase))
            sim = simulate(
                layout,
                shape,
                in_flight=1,
                requests=len(times),
                hardware=hardware,
                seed=seed,
                profiles=profiles,
                overheads=overheads,
            )
            measured = {
                "throughput_rps": len(times) / sum(times),
                "p50_s": statistics.median(times),
                "p95_s": max(times),
            }
            rows.append(
                Row(
                    run_folder(path),
                    path.name,
                    result["layout"],
                    facts.gpu,
                    result["steps"],
                    arm,
                    1,
                    len(times),
                    measured,
                    predicted(sim),
                    notes(facts, result, None, False),
                )
            )
        return rows
    for i, level in enumerate(result["levels"]):
        arm = level.get("arm") or "stream"
        if result["layout"] == "large-only-2gpu":
            arm = "large"
        placement = facts.phase if arm != "random" else "random"
        shape = RequestShape(steps=result["steps"], arm=arm, routing=Routing(level["large_fraction"], placement))
        sim = simulate(
            layout,
            shape,
            in_flight=level["concurrency"],
            requests=level["requests"],
            hardware=hardware,
            seed=seed,
            profiles=profiles,
            overheads=overheads,
        )
        engines = level.get("engines")
        busy = {role: e.get("busy_fraction") for role, e in engines.items()} if isinstance(engines, dict) else {}
        measured = {
            "throughput_rps": level["throughput_rps"],
            "p50_s": level["p50_s"],
            "p95_s": level["p95_s"],
            **{f"busy_{role}": b for role, b in busy.items() if b is not None},
        }
        rows.append(
            Row(
                run_folder(path),
                path.name,
                result["layout"],
                facts.gpu,
                result["steps"],
                arm,
                level["concurrency"],
                level["requests"],
                measured,
                predicted(sim),
                notes(facts, result, level, i == 0),
            )
        )
    return rows


def predicted(sim) -> dict:
    return {
        "throughput_rps": sim.throughput_rps,
        "p50_s": sim.p50_s,
        "p95_s": sim.p95_s,
        **{f"busy_{role}": pool["busy_fraction"] for role, pool in sim.pools.items()},
    }


def measured_files(docs: Path = GPU_DOCS) -> list[Path]:
    files = []
    for path in sorted(docs.glob("**/*.json")):
        keys = set(json.loads(path.read_text()))
        if "layout" in keys and {"levels", "rows"} & keys:
            files.append(path)
    return files


def all_rows(docs: Path = GPU_DOCS) -> list[Row]:
    return [row for path in measured_files(docs) for row in level_rows(path)]


def held_out_rows(docs: Path = GPU_DOCS) -> dict[str, list[Row] | str]:
    """Each run folder's rows predicted from profiles and overheads fitted without that folder (a leave-one-run-out
    check of the fit); a folder whose card has no profile left gets the reason instead."""
    out: dict[str, list[Row] | str] = {}
    by_folder: dict[str, list[Path]] = {}
    for path in measured_files(docs):
        by_folder.setdefault(run_folder(path), []).append(path)
    for folder, paths in by_folder.items():
        left = frozenset({folder})
        profiles = {p.key: p for p in fit_all(docs, exclude=left)}
        overheads = as_overheads(fit_overheads(docs, left))
        try:
            out[folder] = [row for path in paths for row in level_rows(path, profiles=profiles, overheads=overheads)]
        except KeyError as exc:
            out[folder] = f"no profile without this run ({exc.args[0].split(';')[0]})"
    return out


def held_out_table(rows: list[Row], held: dict[str, list[Row] | str]) -> str:
    """Per run folder: median and worst |error| of throughput and p95, fitted on all runs against held out."""

    def stats(subset: list[Row], key: str) -> str:
        errors = [abs(r.error(key)) for r in subset]
        return f"{statistics.median(errors):.0%} / {max(errors):.0%}"

    lines = [
        "| run | rows | throughput, all runs fitted: median / worst | held out | p95, all runs fitted | held out |",
        "|---|---|---|---|---|---|",
    ]
    for folder, other in held.items():
        mine = [r for r in rows if r.run == folder]
        out_thr = stats(other, "throughput_rps") if isinstance(other, list) else other
        out_p95 = stats(other, "p95_s") if isinstance(other, list) else "-"
        lines.append(
            f"| {folder} | {len(mine)} | {stats(mine, 'throughput_rps')} | {out_thr} | {stats(mine, 'p95_s')} "
            f"| {out_p95} |"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def _busy(row: Row, role: str) -> str:
    p = row.predicted.get(f"busy_{role}")
    m = row.measured.get(f"busy_{role}")
    if p is None:
        return "-"
    return f"{p:.2f} / {m:.2f}" if m is not None else f"{p:.2f} / -"


def table(rows: list[Row]) -> str:
    """The markdown table and its closing line of worst errors."""
    lines = [
        (
            "| run | file | card | steps | arm | in flight | req/s pred / meas | err | p50 s pred / meas | err "
            "| p95 s pred / meas | err | busy small pred / meas | busy large pred / meas | note |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        card = "H100" if r.gpu == H100 else "H200"
        lines.append(
            f"| {r.run} | {r.file} | {card} | {r.steps} | {r.arm} | {r.in_flight} | "
            f"{r.predicted['throughput_rps']:.3f} / {r.measured['throughput_rps']:.3f} | "
            f"{_pct(r.error('throughput_rps'))} | "
            f"{r.predicted['p50_s']:.1f} / {r.measured['p50_s']:.1f} | {_pct(r.error('p50_s'))} | "
            f"{r.predicted['p95_s']:.1f} / {r.measured['p95_s']:.1f} | {_pct(r.error('p95_s'))} | "
            f"{_busy(r, 'small')} | {_busy(r, 'large')} | {r.note} |"
        )
    lines.append("")
    lines.append(worst_line(rows))
    return "\n".join(lines)


def worst_line(rows: list[Row]) -> str:
    thr = max(abs(r.error("throughput_rps")) for r in rows)
    p95 = max(abs(r.error("p95_s")) for r in rows)
    return f"worst throughput error: {thr:.1%}, worst p95 error: {p95:.1%}"


def summary(rows: list[Row]) -> str:
    """How many rows meet the targets (throughput within 10%, p95 within 15%), overall and by note."""

    def share(subset):
        ok = sum(abs(r.error("throughput_rps")) <= 0.10 and abs(r.error("p95_s")) <= 0.15 for r in subset)
        return f"{ok} of {len(subset)}"

    clean = [r for r in rows if not r.note]
    return (
        f"Rows meeting both targets (throughput within 10%, p95 within 15%): {share(rows)} in all, {share(clean)} "
        f"of the rows without a note, whose {worst_line(clean)}. Median error over all rows: throughput "
        f"{statistics.median(abs(r.error('throughput_rps')) for r in rows):.1%}, "
        f"p95 {statistics.median(abs(r.error('p95_s')) for r in rows):.1%}."
    )


def document(rows: list[Row], held: dict[str, list[Row] | str]) -> str:
    """What goes between the doc's markers: the table and its worst line, the share meeting the targets, and the
    held-out check."""
    return (
        f"{table(rows)}\n\n{summary(rows)}\n\nLeft out of the fit, one run folder at a time (the profiles and "
        f"call costs refitted without it):\n\n{held_out_table(rows, held)}"
    )


def doc_table(path: Path) -> str:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no validation table between {BEGIN} and {END}")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ops.planner.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="a doc whose table must equal the recomputed one")
    parser.add_argument("--write", type=Path, help="replace the doc's table with the recomputed one")
    args = parser.parse_args(argv)
    text = document(all_rows(), held_out_rows())
    if args.write:
        doc = args.write.read_text()
        head, rest = doc.split(BEGIN, 1)
        args.write.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    if args.check:
        same = doc_table(args.check) == text
        print("the table in the doc is current" if same else f"{args.check}: the table differs; rerun with --write")
        return 0 if same else 1
    if not args.write:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
