"""Engine cost profiles: one vLLM engine's iteration time as a linear function of its batch, fitted by least
squares from the pools' own counters in the committed GPU runs (the JSON files under ``docs/gpu/``) or from an
engine sweep.

    iteration ms = base + per_seq * decode sequences + per_prefill_token * prefill tokens
                   + per_kilo_context * (context tokens of the decode sequences / 1000)
                   + mixed (only in an iteration that computes prefill tokens: it leaves the decode-only path)

A result level's engine block gives two points per pool: its decode-only iterations (decode sequences per
iteration, no prefill) and its mixed ones (the same sequences plus the prefill tokens per mixed iteration), each
at the context the request shape gives (prompt plus half the reasoning on average). An engine that shares its
GPU runs ``shared_slowdown`` times slower while the other engine on it is busy: measured by a side-by-side sweep
where one exists, else the time-slicing factor 2 (``sharing_slowdown``).
``python -m cluster.ops.planner.profiles fit`` writes ``cluster/ops/planner/profiles/*.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from cluster.ops.planner.runs import GPU_DOCS, RUNS, VERSIONS, facts_for, gpu_key, run_folder

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
TERMS = ("base_ms", "per_seq_ms", "per_prefill_token_ms", "per_kilo_context_ms", "mixed_ms")
SHAPES = {"small": "qwen2.5-1.5b", "large": "qwen2.5-14b"}  # the benchmark config's pools
BENCH_REQUEST = {"prompt_tokens": 200, "step_tokens": 96, "final_tokens": 128}  # cluster/configs/gpu-bench.yaml


class Coefficients(BaseModel):
    base_ms: float = Field(description="Fixed cost of one iteration (weights read, launch, scheduler).")
    per_seq_ms: float = Field(description="Cost of each decode sequence in the batch.")
    per_prefill_token_ms: float = Field(description="Cost of each prompt token computed in the iteration.")
    per_kilo_context_ms: float = Field(description="Cost of each 1000 context tokens the decode sequences attend to.")
    mixed_ms: float = Field(0.0, description="Fixed extra cost of an iteration that computes prefill tokens.")


class Profile(BaseModel):
    """One engine's cost for a model shape on a card with given engine settings."""

    model: str = Field(description="Model shape, e.g. qwen2.5-14b.")
    gpu: str = Field(description="The card, as nvidia-smi names it.")
    graphs: str = Field("default", description="CUDA-graph mode: default (vLLM's) or FULL.")
    coefficients: Coefficients
    shared_slowdown: float | None = Field(
        None,
        description="Iteration time multiplier while another engine on the "
        "same GPU is busy, from a side-by-side sweep; None where none was measured (time slicing, 2, applies).",
    )
    max_num_seqs: int = Field(256, description="Engine's max_num_seqs in the runs it was fitted from.")
    max_num_batched_tokens: int = Field(8192, description="Chunked-prefill budget (vLLM's default on these cards).")
    kv_cache_tokens: int = Field(description="KV cache capacity in tokens at the benchmark's kv_cache_gib.")
    versions: dict[str, str] = Field(default_factory=lambda: dict(VERSIONS))
    sources: list[str] = Field(default_factory=list, description="Result files the fit read.")
    fit_points: int = 0
    fit_rms_ms: float = 0.0
    fit_worst_error: float = Field(0.0, description="Largest relative error of a fitted point.")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.gpu, self.graphs)

    def iteration_ms(self, decode_seqs: float, prefill_tokens: float, context_tokens: float) -> float:
        """One iteration's time alone on its GPU."""
        c = self.coefficients
        return (
            c.base_ms
            + c.per_seq_ms * decode_seqs
            + c.per_prefill_token_ms * prefill_tokens
            + c.per_kilo_context_ms * context_tokens / 1000
            + (c.mixed_ms if prefill_tokens else 0.0)
        )


KV_BYTES_PER_TOKEN = {
    "qwen2.5-1.5b": 2 * 28 * 2 * 128 * 2,
    "qwen2.5-14b": 2 * 48 * 8 * 128 * 2,
    "qwen2.5-32b": 2 * 64 * 8 * 128 * 2,
}  # K and V, layers, KV heads, head dim, bf16
KV_GIB = {"qwen2.5-1.5b": 16, "qwen2.5-14b": 40}  # the split layouts' kv_cache_gib (loadtests/gpu_bench.py)


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: refit without the columns that come out negative."""
    keep = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        if keep:
            coef[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        negative = [i for i in keep if coef[i] < 0]
        if not negative:
            return coef
        keep.remove(min(negative, key=lambda i: coef[i]))


def mean_context(steps: int, prompt_tokens: int = 200, step_tokens: int = 96) -> float:
    """A decoding sequence's mean context over a request: the prompt and, on average, half its reasoning."""
    return prompt_tokens + step_tokens * steps / 2


def level_points(engine: dict, steps: int) -> list[tuple[float, float, float, float]]:
    """(decode seqs, prefill tokens, context tokens, ms) of a level's decode and mixed busy iterations."""
    by_phase = engine.get("ms_per_busy_iteration_by_phase")
    if not by_phase or engine.get("decode_tokens_per_iteration") is None:
        return []
    seqs = engine["decode_tokens_per_iteration"]
    context = seqs * mean_context(steps)
    points = [(seqs, 0.0, context, by_phase["decode"])]
    if by_phase.get("mixed") and engine.get("prefill_tokens_per_mixed_iteration"):
        points.append((seqs, engine["prefill_tokens_per_mixed_iteration"], context, by_phase["mixed"]))
    return points


def result_files(docs: Path = GPU_DOCS, key: str = "levels", exclude: frozenset[str] = frozenset()) -> list[Path]:
    """Result files with load levels (``key="levels"``) or single-stream rows (``key="rows"``), but those of the run
    folders in ``exclude`` (a held-out check)."""
    return sorted(
        p
        for p in docs.glob("**/*.json")
        if {key, "layout"} <= set(json.loads(p.read_text())) and not (exclude and run_folder(p) in exclude)
    )


def single_points(
    docs: Path = GPU_DOCS, exclude: frozenset[str] = frozenset()
) -> dict[tuple[str, str, str], list[tuple]]:
    """One sequence at a time: each pool's step time per token in the single-stream runs (``gpu_bench single``),
    the iteration time at a batch of one (a step's uncached prefill is in it, a few percent)."""
    points: dict[tuple[str, str, str], list[tuple]] = {}
    for path in result_files(docs, "rows", exclude):
        result = json.loads(path.read_text())
        facts = facts_for(path, result)
        steps, tokens = result["steps"], BENCH_REQUEST["step_tokens"]
        for row in result["rows"]:
            large = row["large_steps"]
            for role, seconds, count in (
                ("small", row["small_steps_s"], row["steps"] - large),
                ("large", row["large_steps_s"], large),
            ):
                if count:
                    key = (SHAPES[role], facts.gpu, facts.small_graphs if role == "small" else "default")
                    points.setdefault(key, []).append(
                        (1.0, 0.0, mean_context(steps), seconds * 1e3 / (count * tokens), str(path))
                    )
    return points


def alone_points(
    docs: Path = GPU_DOCS, exclude: frozenset[str] = frozenset()
) -> dict[tuple[str, str, str], list[tuple]]:
    """Fit points by (model, card, graphs) from the layouts where each engine has its GPU."""
    points: dict[tuple[str, str, str], list[tuple]] = {}
    for path in result_files(docs, exclude=exclude):
        result = json.loads(path.read_text())
        if result["layout"] not in ("routed-2gpu", "large-only-2gpu"):
            continue
        facts = facts_for(path, result)
        for level in result["levels"]:
            engines = level.get("engines")
            if not isinstance(engines, dict):
                continue
            if facts.cold_first_level and level is result["levels"][0]:
                continue  # the engines had just compiled: the sixth run measured that level slow
            for role, engine in engines.items():
                graphs = facts.small_graphs if role == "small" else "default"
                for point in level_points(engine, result["steps"]):
                    points.setdefault((SHAPES[role], facts.gpu, graphs), []).append((*point, str(path)))
    return points


SMALL_GRAPH_LIMIT = 512  # prefill tokens: above vLLM's capture size a FULL-graph iteration runs without graphs


def sweep_points(path: Path) -> dict[tuple[str, str, str, bool], list[tuple]]:
    """Points of an engine sweep file (the format of the tenth run's sweep): rows of model, shared, decode_seqs,
    prefill_tokens, context_tokens (each sequence's), iter_ms, in a list or under ``rows`` (the card from
    ``versions.gpu`` or ``gpu``, else the file's name). Rows under CUDA MPS are left out, and the small model's
    rows above ``SMALL_GRAPH_LIMIT`` prefill tokens (they run without CUDA graphs, which the pools never do)."""
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    meta = data if isinstance(data, dict) else {}
    gpu = meta.get("versions", {}).get("gpu") or meta.get("gpu")
    gpu = gpu or ("NVIDIA H100 80GB HBM3" if "h100" in path.name else "NVIDIA H200")
    points: dict[tuple, list[tuple]] = {}
    for row in rows:
        model = row["model"].lower().split("/")[-1]
        small = "1.5b" in model
        if row.get("mps") or (small and row["prefill_tokens"] > SMALL_GRAPH_LIMIT):
            continue
        key = (model, row.get("gpu", gpu), row.get("graphs", "FULL" if small else "default"), bool(row.get("shared")))
        context = row["decode_seqs"] * row["context_tokens"]
        points.setdefault(key, []).append(
            (row["decode_seqs"], row["prefill_tokens"], context, row["iter_ms"], str(path))
        )
    return points


RIDGE = (0.0, 10.0, 0.0, 10.0, 0.0)  # per_seq and per_kilo_context toward 0 where the points cannot tell them from base


def fit_coefficients(points: list[tuple]) -> tuple[Coefficients, float, float]:
    """Coefficients, rms error (ms) and worst relative error of the nonnegative least-squares fit. The runs'
    batches vary little (26-46 sequences), so a small ridge term keeps the per-sequence and context terms at
    what the points show, not at whatever trades off against the base."""
    x = np.array([[1.0, p[0], p[1], p[2] / 1000, float(p[1] > 0)] for p in points])
    y = np.array([p[3] for p in points])
    coef = nonnegative_lstsq(np.vstack([x, np.diag(RIDGE)]), np.concatenate([y, np.zeros(len(RIDGE))]))
    fitted = x @ coef
    return (
        Coefficients(**dict(zip(TERMS, (round(float(c), 5) for c in coef), strict=True))),
        float(np.sqrt(np.mean((fitted - y) ** 2))),
        float(np.max(np.abs(fitted - y) / y)),
    )


def fit_all(
    docs: Path = GPU_DOCS, sweeps: list[Path] | None = None, exclude: frozenset[str] = frozenset(), sweep_times=False
) -> list[Profile]:
    """Every profile the committed runs support, leaving out the run folders in ``exclude``. Engine sweeps
    (``sweeps``) give the sharing factor: each side-by-side row over the row of the same batch alone. Their
    iteration times join the fit only with ``sweep_times``: a sweep times the engine core's own loop in process,
    which the pools' busy time per iteration need not equal."""
    points = alone_points(docs, exclude)
    for key, pts in single_points(docs, exclude).items():
        points.setdefault(key, []).extend(pts)
    sweeps = sweeps or []
    by_sweep = [sweep_points(sweep) for sweep in sweeps]
    if sweep_times:
        for found in by_sweep:
            for (*key, shared), pts in found.items():
                if not shared:
                    points.setdefault(tuple(key), []).extend(pts)
    profiles = {}
    for key, pts in sorted(points.items()):
        coef, rms, worst = fit_coefficients(pts)
        model, gpu, graphs = key
        kv = int(KV_GIB.get(model, 24) * 2**30 / KV_BYTES_PER_TOKEN[model])
        profiles[key] = Profile(
            model=model,
            gpu=gpu,
            graphs=graphs,
            coefficients=coef,
            kv_cache_tokens=kv,
            sources=sorted({p[4] for p in pts}),
            fit_points=len(pts),
            fit_rms_ms=round(rms, 3),
            fit_worst_error=round(worst, 3),
        )
    for found in by_sweep:
        for (*key, shared), pts in found.items():
            key = tuple(key)
            if not shared or key not in profiles:
                continue
            alone = {p[:3]: p[3] for p in found.get((*key, False), [])}
            ratios = [p[3] / alone[p[:3]] for p in pts if p[:3] in alone]
            ratios = ratios or [p[3] / profiles[key].iteration_ms(*p[:3]) for p in pts]
            profiles[key].shared_slowdown = round(float(np.mean(ratios)), 3)
            profiles[key].sources = sorted({*profiles[key].sources, pts[0][4]})
    root = GPU_DOCS.parent.parent
    for profile in profiles.values():
        profile.sources = [
            str(Path(s).resolve().relative_to(root)) if Path(s).resolve().is_relative_to(root) else s
            for s in profile.sources
        ]
    return list(profiles.values())


def profile_name(profile: Profile) -> str:
    return f"{gpu_key(profile.gpu)}-{profile.model}-{profile.graphs.lower()}.json"


def write_profiles(profiles: list[Profile], folder: Path = PROFILE_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for profile in profiles:
        path = folder / profile_name(profile)
        path.write_text(profile.model_dump_json(indent=1) + "\n")
        paths.append(path)
    return paths


def load_profiles(folder: Path = PROFILE_DIR) -> dict[tuple[str, str, str], Profile]:
    return {(p := Profile.model_validate_json(f.read_text())).key: p for f in sorted(folder.glob("*.json"))}


def find_profile(profiles: dict, model: str, gpu: str, graphs: str = "default") -> Profile:
    """The profile of (model, card, graphs); else the same model and card with other graphs; KeyError names what
    exists."""
    for key in ((model, gpu, graphs), *((m, g, gr) for m, g, gr in profiles if m == model and g == gpu)):
        if key in profiles:
            return profiles[key]
    raise KeyError(
        f"no profile for {model} on {gpu}; have: " + ", ".join(f"{m} on {g} ({gr})" for m, g, gr in profiles)
    )


TIME_SLICING = 2.0  # two processes on one GPU without MPS take turns: while both compute, each gets half of it


def sharing_slowdown(profiles: dict, profile: Profile) -> float:
    """The profile's sharing factor where a side-by-side sweep measured it (or measured it for the same model on
    the same card with other graphs), else the time-slicing factor (the one shared-layout level with busy
    counters, the fifth run's first, ran right after a compile and says 2.0-2.2x for the small engine and about
    1.7x for the large one, too thin to fit)."""
    if profile.shared_slowdown is not None:
        return profile.shared_slowdown
    same = [p.shared_slowdown for p in profiles.values() if (p.model, p.gpu) == (profile.model, profile.gpu)]
    measured = [x for x in same if x is not None]
    return float(np.mean(measured)) if measured else TIME_SLICING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ops.planner.profiles", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "fit", help="fit the profiles from the JSON files under docs/gpu/ (and sweep files) and write them"
    )
    p.add_argument("--docs", type=Path, default=GPU_DOCS)
    p.add_argument(
        "--sweep",
        type=Path,
        action="append",
        default=[],
        help="engine sweep JSON (rows of model, shared, decode_seqs, prefill_tokens, context_tokens, iter_ms)",
    )
    p.add_argument(
        "--sweep-times", action="store_true", help="fit the sweeps' iteration times too, not only their sharing factors"
    )
    p.add_argument("--out", type=Path, default=PROFILE_DIR)
    args = parser.parse_args(argv)
    known = set(RUNS)
    profiles = fit_all(args.docs, args.sweep or None, sweep_times=args.sweep_times)
    for path, profile in zip(write_profiles(profiles, args.out), profiles, strict=True):
        c = profile.coefficients
        print(
            f"{path.name}: {c.base_ms:.3f} ms + {c.per_seq_ms:.4f}/seq + {c.per_prefill_token_ms:.5f}/prefill token "
            f"+ {c.per_kilo_context_ms:.4f}/1k context + {c.mixed_ms:.3f} if mixed; shared x{profile.shared_slowdown}; "
            f"{profile.fit_points} points, rms {profile.fit_rms_ms} ms, worst {profile.fit_worst_error:.1%}"
        )
    print(f"run folders known: {len(known)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
