"""``plan`` command of the operators' CLI: how many replicas each pool needs for a request rate.

Each request writes ``steps`` reasoning steps of ``step_tokens`` tokens; a fraction F of them goes to
the large pool, the rest to the small pool, and every step costs the small pool one glimpse. The large
pool also writes the final answer. F comes from ``--large-fraction`` or from ``--tau`` through the
tau -> F table of ``cluster calibrate --out FILE``. Per-replica throughput is what
``python -m loadtests.pool_bench`` measures. ``python -m cluster plan --help`` lists the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cluster.config import PoolRole, load_config

ADVISED_BAND = (0.2, 0.3)  # large-step fraction the GlimpRouter paper advises
FORMULA = (
    "replicas = ceil(demand / (replica tok/s * utilization)), at least 1; "
    "small demand = rate*steps*((1-F)*step_tokens + glimpse_cost); "
    "large demand = rate*(steps*F*step_tokens + final_tokens)"
)


def fraction_at_tau(tau: float, taus: list[float], fractions: list[float]) -> float:
    """Large-step fraction at ``tau``, linear between calibration points, clamped beyond the ends."""
    if tau <= taus[0]:
        return fractions[0]
    if tau >= taus[-1]:
        return fractions[-1]
    i = next(i for i, t in enumerate(taus) if t > tau)
    share = (tau - taus[i - 1]) / (taus[i] - taus[i - 1])
    return fractions[i - 1] + share * (fractions[i] - fractions[i - 1])


def pool_demand(rate: float, steps: float, step_tokens: float, final_tokens: float, large_fraction: float,
                glimpse_cost: float = 1.0) -> dict[PoolRole, float]:
    """Output tokens/s each pool must write (the small pool's includes one glimpse per step)."""
    return {
        "small": rate * steps * ((1 - large_fraction) * step_tokens + glimpse_cost),
        "large": rate * (steps * large_fraction * step_tokens + final_tokens),
    }


def replicas_needed(demand: float, replica_tps: float, utilization: float) -> int:
    """Replicas that serve ``demand`` tokens/s with each replica at ``utilization`` of its throughput."""
    return max(1, math.ceil(round(demand / (replica_tps * utilization), 9)))  # round: no 3.0000000001 -> 4


def load_calibration(path: Path) -> tuple[list[float], list[float]]:
    """The (taus, large fractions) of a calibration file; ValueError says what is wrong with it."""
    try:
        data = json.loads(path.read_text())
        taus, fractions = [float(t) for t in data["taus"]], [float(f) for f in data["large_fraction"]]
    except OSError as exc:
        raise ValueError(f"cannot read calibration {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration {path}: expected JSON {{\"taus\": [...], \"large_fraction\": [...]}} "
                         f"of numbers ({type(exc).__name__}: {exc})") from exc
    if len(taus) != len(fractions) or len(taus) < 2:
        raise ValueError(f"calibration {path}: 'taus' and 'large_fraction' need the same length, at least 2")
    if any(b <= a for a, b in zip(taus, taus[1:])):
        raise ValueError(f"calibration {path}: 'taus' must be strictly increasing")
    if not all(0 <= f <= 1 for f in fractions):
        raise ValueError(f"calibration {path}: every 'large_fraction' must lie in [0, 1]")
    return taus, fractions


def plan(args: argparse.Namespace, large_fraction: float) -> dict:
    """Demand and replicas of both pools (with the config's bounds when ``args.config`` is set)."""
    demand = pool_demand(args.rate, args.steps, args.step_tokens, args.final_tokens, large_fraction, args.glimpse_cost)
    cfg = load_config(args.config) if args.config else None
    pools = {}
    for role, tps in (("small", args.small_tps), ("large", args.large_tps)):
        pools[role] = {"demand_tps": demand[role], "replica_tps": tps,
                       "replicas": replicas_needed(demand[role], tps, args.utilization)}
        if cfg:
            scaling = getattr(cfg.pools, role).autoscaling
            pools[role].update(min_replicas=scaling.min_replicas, max_replicas=scaling.max_replicas)
    return {"large_fraction": large_fraction, "tau": args.tau, "utilization": args.utilization, "pools": pools}


def print_table(result: dict) -> None:
    """The plan as a table, then the formula."""
    source = f"tau {result['tau']:g} via calibration" if result["tau"] is not None else "given"
    print(f"large-step fraction F = {result['large_fraction']:.3f} ({source}); "
          f"utilization {result['utilization']:g}")
    print(f"{'pool':<6} {'demand tok/s':>13} {'replica tok/s':>14} {'replicas':>9} {'min':>5} {'max':>5}")
    for role, p in result["pools"].items():
        print(f"{role:<6} {p['demand_tps']:>13.1f} {p['replica_tps']:>14.1f} {p['replicas']:>9} "
              f"{p.get('min_replicas', '-'):>5} {p.get('max_replicas', '-'):>5}")
    print(FORMULA)


def plot(args: argparse.Namespace, taus: list[float], fractions: list[float]) -> None:
    """Write a PNG of each pool's replicas against tau over the calibration range, with F on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [taus[0] + (taus[-1] - taus[0]) * i / 400 for i in range(401)]
    shares = [fraction_at_tau(t, taus, fractions) for t in grid]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for role, tps in (("small", args.small_tps), ("large", args.large_tps)):
        counts = [replicas_needed(pool_demand(args.rate, args.steps, args.step_tokens, args.final_tokens, f,
                                              args.glimpse_cost)[role], tps, args.utilization) for f in shares]
        ax.step(grid, counts, where="post", label=f"{role} replicas")
    ax.set_xlabel("tau (nats)")
    ax.set_ylabel("replicas needed")
    ax.set_title(f"{args.rate:g} req/s, {args.steps:g} steps x {args.step_tokens:g} tokens, "
                 f"utilization {args.utilization:g}")
    frac_ax = ax.twinx()
    frac_ax.plot(grid, shares, color="grey", linestyle="--", label="large-step fraction")
    frac_ax.axhspan(*ADVISED_BAND, color="green", alpha=0.15, label="advised 20-30% large")
    frac_ax.set_ylim(0, 1)
    frac_ax.set_ylabel("large-step fraction")
    if args.tau is not None:
        ax.axvline(args.tau, color="black", linewidth=0.8, label=f"tau {args.tau:g}")
    handles = ax.get_legend_handles_labels()[0] + frac_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(args.plot, format="png")
    plt.close(fig)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        calibration = load_calibration(args.calibration) if args.calibration else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if calibration is None and (args.tau is not None or args.plot):
        print("error: --tau and --plot need --calibration FILE (from `cluster calibrate --out FILE`)", file=sys.stderr)
        return 2
    fraction = args.large_fraction if args.tau is None else fraction_at_tau(args.tau, *calibration)
    result = plan(args, fraction)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    for role, p in result["pools"].items():
        if p["replicas"] > p.get("max_replicas", math.inf):
            print(f"warning: the {role} pool needs {p['replicas']} replicas, above "
                  f"pools.{role}.autoscaling.max_replicas = {p['max_replicas']}", file=sys.stderr)
    if args.plot:
        plot(args, *calibration)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _number(low: float, *, above: bool = False, high: float = math.inf):
    """An argparse type: a float >= ``low`` (> with ``above``) and <= ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > low if above else value >= low) or value > high:  # NaN fails too
            bound = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command to a CLI; its ``func(args)`` returns the exit code."""
    positive, nonnegative = _number(0, above=True), _number(0)
    p = subparsers.add_parser("plan", help="replicas each pool needs for a request rate",
                              description=__doc__.splitlines()[0], epilog=FORMULA)
    p.add_argument("--rate", type=positive, required=True, help="requests per second")
    p.add_argument("--steps", type=positive, required=True, help="reasoning steps per request")
    p.add_argument("--step-tokens", type=positive, required=True, help="tokens per step")
    p.add_argument("--final-tokens", type=nonnegative, required=True, help="answer tokens (large pool)")
    share = p.add_mutually_exclusive_group(required=True)
    share.add_argument("--large-fraction", type=_number(0, high=1), help="fraction F of steps the large pool writes")
    share.add_argument("--tau", type=nonnegative, help="entropy threshold; F read from --calibration")
    p.add_argument("--calibration", type=Path, help="JSON {taus, large_fraction} from `cluster calibrate --out`")
    p.add_argument("--small-tps", type=positive, required=True, help="output tok/s one small replica sustains")
    p.add_argument("--large-tps", type=positive, required=True, help="output tok/s one large replica sustains")
    p.add_argument("--glimpse-cost", type=nonnegative, default=1.0,
                   help="small-pool token-equivalents per glimpse (default: %(default)s)")
    p.add_argument("--utilization", type=_number(0, above=True, high=1), default=0.7,
                   help="target fraction of replica throughput (default: %(default)s)")
    p.add_argument("--config", help="config file or shipped name: show its min/max replicas, warn above max")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", type=Path, metavar="PATH.png", help="plot replicas against tau (needs --calibration)")
    p.set_defaults(func=cmd_plan)
