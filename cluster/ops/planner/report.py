"""What ``plan`` and ``predict`` print: tables, the verdict on routing, the autoscaling targets, and the curves."""

from __future__ import annotations

from pathlib import Path

from cluster.ops.planner.search import Plan, autoscaling_targets, run
from cluster.ops.planner.simulator import Hardware, Result
from cluster.ops.planner.system import Layout, RequestShape, spec_of


def unit(closed: bool) -> str:
    return "in flight" if closed else "req/s"


def describe(layout: Layout) -> str:
    """A layout in words: ``2 GPUs: small | large``."""
    gpus = " | ".join("+".join(roles) for roles in layout.gpus)
    return f"{len(layout.gpus)} GPU{'s' * (len(layout.gpus) > 1)}: {gpus}"


def plan_lines(p: Plan, hardware: Hardware) -> list[str]:
    u = unit(p.closed)
    lines = [
        f"load {p.load:g} {u}, target p95 <= {p.target.p95_s:g} s"
        + (f" and {p.target.goodput:.0%} within {p.target.bound_s:g} s" if p.target.goodput else "")
        + f", {hardware.gpu}",
        "",
        (
            f"{'cell (copies of it serve the load)':<38} {'capacity ' + u:>16} {'copies':>7} {'GPUs':>5} "
            f"{'p50 s':>7} {'p95 s':>7}"
        ),
    ]
    for c in sorted(p.cells, key=lambda c: (c.gpus or 10**9, spec_of(c.layout))):
        p50 = f"{c.per_copy.p50_s:7.1f}" if c.per_copy else "      -"
        p95 = f"{c.per_copy.p95_s:7.1f}" if c.per_copy else "      -"
        lines.append(
            f"{describe(c.layout):<38} {c.capacity:>16.3g} {c.copies or '-':>7} {c.gpus or '-':>5} {p50} {p95}"
        )
    lines.append("")
    if p.best is None:
        lines.append("no cell meets the target at any load: loosen the target or shorten the request")
        return lines
    b = p.best
    lines.append(
        f"cheapest: {b.copies} x [{describe(b.layout)}] = {b.gpus} GPU{'s' * (b.gpus > 1)}, "
        f"predicted p50 {b.per_copy.p50_s:.1f} s, p95 {b.per_copy.p95_s:.1f} s (layout spec {spec_of(b.layout)})"
    )
    if p.large_only is not None:
        lo = p.large_only
        lines.append(
            f"large only: {lo.gpus} GPU{'s' * (lo.gpus > 1)} ({lo.copies} x [{describe(lo.layout)}]), "
            f"p95 {lo.per_copy.p95_s:.1f} s"
        )
    gain = p.gain
    if p.routing_pays:
        saved = f"{p.large_only.gpus - b.gpus} GPUs fewer, " if p.large_only and p.large_only.gpus > b.gpus else ""
        lines.append(f"routing pays: {saved}{gain:.2f}x the load per GPU of large only at this target")
    else:
        r = p.best_routed
        why = (
            (
                f": the best routed cell, {r.copies} x [{describe(r.layout)}] = {r.gpus} GPU{'s' * (r.gpus > 1)}, "
                f"serves {gain:.2f}x the load per GPU of large only"
            )
            if r is not None and gain
            else ""
        )
        lines.append(f"routing does not pay here{why}; run the large pool alone")
    lines.append("")
    lines.append("autoscaling targets (Ray Serve, per pool, from the same prediction):")
    for role, t in autoscaling_targets(b).items():
        lines.append(
            f"  {role:<6} replicas {t['replicas']}, min_replicas {t['min_replicas']}, max_replicas "
            f"{t['max_replicas']}, target_ongoing_requests {t['target_ongoing_requests']} "
            f"(busy {t['busy_fraction']:.0%} at the planned load)"
        )
    return lines


def plan_dict(p: Plan) -> dict:
    return {
        "load": p.load,
        "unit": unit(p.closed),
        "target_p95_s": p.target.p95_s,
        "best": p.best.as_dict() if p.best else None,
        "large_only": p.large_only.as_dict() if p.large_only else None,
        "routing_pays": p.routing_pays,
        "gain_per_gpu": p.gain,
        "autoscaling": autoscaling_targets(p.best) if p.best else {},
        "cells": [c.as_dict() for c in p.cells],
    }


def predict_lines(layout: Layout, shape: RequestShape, result: Result, load: str, hardware: Hardware) -> list[str]:
    tokens = "-".join(map(str, shape.step_tokens_range or [shape.step_tokens]))
    lines = [
        (
            f"{describe(layout)} on {hardware.gpu}; {shape.steps} steps of {tokens} tokens, prompt "
            f"{shape.prompt_tokens}, answer {shape.final_tokens}; arm {shape.arm}, large fraction "
            f"{1.0 if shape.arm == 'large' else shape.routing.fraction():.3f}; {load}"
        ),
        f"throughput {result.throughput_rps:.3f} req/s"
        + (f" (steady {result.steady_rps:.3f})" if result.steady_rps else "")
        + f", p50 {result.p50_s:.2f} s, p95 {result.p95_s:.2f} s over {result.requests} requests"
        + (f"; {result.unfinished} unfinished: over capacity" if result.unfinished else ""),
    ]
    for role, pool in result.pools.items():
        lines.append(
            f"  {role:<6} {pool['replicas']} replica(s): busy {pool['busy_fraction']:.0%}, "
            f"{pool['iterations_per_request']:.1f} iterations a request at {pool['ms_per_busy_iteration']:.2f} ms, "
            f"{pool['decode_tokens_per_iteration']:.1f} decode seqs an iteration, prefix-cache hit "
            f"{pool['cache_hit']:.1%}, {pool['open_calls_mean']:.1f} calls open per replica"
        )
    return lines


def plot(p: Plan, shape: RequestShape, hardware: Hardware, path: Path, points: int = 8) -> None:
    """p95 against load per GPU for the best cell and the best large-only cell, with the target."""
    import matplotlib

    matplotlib.use("Agg")
    from dataclasses import replace

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, cell in (("cheapest", p.best), ("large only", p.large_only)):
        if cell is None or not cell.capacity:
            continue
        here = shape if cell.layout.count("small") else replace(shape, arm="large")
        loads = [cell.capacity * 1.3 * (i + 1) / points for i in range(points)]
        p95 = [run(cell.layout, here, x, p.closed, hardware, 120.0).p95_s for x in loads]
        per_gpu = [x / len(cell.layout.gpus) for x in loads]
        ax.plot(per_gpu, p95, marker="o", label=f"{label}: {describe(cell.layout)}")
    ax.axhline(p.target.p95_s, color="black", linewidth=0.8, linestyle="--", label=f"target p95 {p.target.p95_s:g} s")
    ax.set_xlabel(f"load per GPU ({unit(p.closed)})")
    ax.set_ylabel("predicted p95 (s)")
    ax.set_title(
        f"{shape.steps} steps x {shape.step_tokens} tokens, large fraction {shape.routing.fraction():.2f}, "
        f"{hardware.gpu}"
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
