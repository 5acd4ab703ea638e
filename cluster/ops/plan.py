"""``plan`` and ``predict`` of the operators' CLI, on the performance model of ``cluster/ops/planner/``.

``plan`` searches replica mixes and layouts (pools split, pools sharing GPUs, data-parallel small replicas, large
only) for the cheapest that meets a p95 (or goodput) target at a request rate or a number in flight, with the
large-step fraction from ``--large-fraction`` or from ``--tau`` through the tau -> F table of ``cluster calibrate
--out FILE``; it says what large only needs for the same load and whether routing pays. ``predict`` prints the
simulator's prediction for one layout, request shape and load. ``docs/planning.md`` explains the model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from cluster.config import load_config

GPUS = {"h200": "NVIDIA H200", "h100": "NVIDIA H100 80GB HBM3"}


def fraction_at_tau(tau: float, taus: list[float], fractions: list[float]) -> float:
    """Large-step fraction at ``tau``, linear between calibration points, clamped beyond the ends."""
    if tau <= taus[0]:
        return fractions[0]
    if tau >= taus[-1]:
        return fractions[-1]
    i = next(i for i, t in enumerate(taus) if t > tau)
    share = (tau - taus[i - 1]) / (taus[i] - taus[i - 1])
    return fractions[i - 1] + share * (fractions[i] - fractions[i - 1])


def load_calibration(path: Path) -> tuple[list[float], list[float]]:
    """The (taus, large fractions) of a calibration file; ValueError says what is wrong with it."""
    try:
        data = json.loads(path.read_text())
        taus, fractions = [float(t) for t in data["taus"]], [float(f) for f in data["large_fraction"]]
    except OSError as exc:
        raise ValueError(f"cannot read calibration {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f'calibration {path}: expected JSON {{"taus": [...], "large_fraction": [...]}} '
            f"of numbers ({type(exc).__name__}: {exc})"
        ) from exc
    if len(taus) != len(fractions) or len(taus) < 2:
        raise ValueError(f"calibration {path}: 'taus' and 'large_fraction' need the same length, at least 2")
    if any(b <= a for a, b in itertools.pairwise(taus)):
        raise ValueError(f"calibration {path}: 'taus' must be strictly increasing")
    if not all(0 <= f <= 1 for f in fractions):
        raise ValueError(f"calibration {path}: every 'large_fraction' must lie in [0, 1]")
    return taus, fractions


def _shape(args, fraction: float):
    from cluster.ops.planner.system import RequestShape, Routing

    entropy = {}
    if args.entropy is not None and args.tau is not None:  # each step's entropy drawn, routed against tau
        entropy = {"entropy_mu": args.entropy[0], "entropy_sigma": args.entropy[1], "tau": args.tau}
    return RequestShape(
        prompt_tokens=args.prompt_tokens,
        steps=int(args.steps),
        step_tokens=int(args.step_tokens),
        final_tokens=int(args.final_tokens),
        step_tokens_range=args.step_tokens_range,
        arm=getattr(args, "arm", "stream"),
        routing=Routing(fraction, args.placement, **entropy),
    )


def _pair(kind, what: str):
    """An argparse type: ``A:B`` of two ``kind`` values."""

    def parse(text: str):
        try:
            a, b = (kind(x) for x in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"want {what}, got {text!r}") from None
        return a, b

    return parse


def _fraction(args) -> float:
    """F from --large-fraction, or from --tau through --calibration or --entropy (ValueError says what is wrong)."""
    if args.tau is None:
        return args.large_fraction
    if args.entropy is not None:
        from cluster.ops.planner.system import Routing

        return Routing(entropy_mu=args.entropy[0], entropy_sigma=args.entropy[1], tau=args.tau).fraction()
    if not args.calibration:
        raise ValueError("--tau needs --calibration FILE (from `cluster calibrate --out FILE`) or --entropy MU:SIGMA")
    return fraction_at_tau(args.tau, *load_calibration(args.calibration))


def cmd_plan(args: argparse.Namespace) -> int:
    from cluster.ops.planner import report, search
    from cluster.ops.planner.simulator import Hardware

    try:
        fraction = _fraction(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (args.goodput is None) != (args.bound is None):
        print("error: --goodput and --bound go together", file=sys.stderr)
        return 2
    hardware = Hardware(gpu=GPUS[args.gpu], small_graphs=args.small_graphs)
    target = search.Target(args.p95, args.goodput, args.bound)
    closed = args.in_flight is not None
    load = args.in_flight if closed else args.rate
    result = search.plan(
        _shape(args, fraction),
        load,
        target,
        closed=closed,
        hardware=hardware,
        max_cell_gpus=args.max_cell_gpus,
        max_gpus=args.max_gpus,
        duration_s=args.duration,
    )
    if args.json:
        print(json.dumps({"large_fraction": fraction, "tau": args.tau, **report.plan_dict(result)}, indent=2))
    else:
        source = f"tau {args.tau:g} via calibration" if args.tau is not None else "given"
        print(f"large-step fraction F = {fraction:.3f} ({source})")
        print("\n".join(report.plan_lines(result, hardware)))
    if args.config and result.best is not None:
        cfg = load_config(args.config)
        for role, t in search.autoscaling_targets(result.best).items():
            bound = getattr(cfg.pools, role).autoscaling.max_replicas
            if t["replicas"] > bound:
                print(
                    f"warning: the {role} pool needs {t['replicas']} replicas, above "
                    f"pools.{role}.autoscaling.max_replicas = {bound}",
                    file=sys.stderr,
                )
    if args.plot:
        report.plot(result, _shape(args, fraction), hardware, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if result.best is not None else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from cluster.ops.planner import report
    from cluster.ops.planner.simulator import Hardware, simulate
    from cluster.ops.planner.system import parse_layout

    try:
        fraction = _fraction(args)
        layout = parse_layout(args.layout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = _shape(args, fraction)
    if not layout.count("small") and shape.arm != "large":
        shape = replace(shape, arm="large")
    if not layout.count("large"):
        print("error: the layout has no large replica (it writes the final answer)", file=sys.stderr)
        return 2
    hardware = Hardware(gpu=GPUS[args.gpu], small_graphs=args.small_graphs)
    if args.in_flight is not None:
        n = int(args.in_flight)
        result = simulate(
            layout, shape, in_flight=n, requests=args.requests or 2 * n, hardware=hardware, seed=args.seed
        )
        load = f"closed loop, {n} in flight, {result.requests} requests"
    else:
        result = simulate(layout, shape, rate=args.rate, duration_s=args.duration, hardware=hardware, seed=args.seed)
        load = f"Poisson arrivals at {args.rate:g} req/s for {args.duration:g} s"
    if args.json:
        print(json.dumps({"layout": args.layout, "large_fraction": fraction, **result.as_dict()}, indent=2))
    else:
        print("\n".join(report.predict_lines(layout, shape, result, load, hardware)))
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


def _request_flags(p: argparse.ArgumentParser) -> None:
    positive, nonnegative = _number(0, above=True), _number(0)
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=positive, help="requests per second (Poisson arrivals)")
    load.add_argument("--in-flight", type=positive, help="requests in flight (a closed loop)")
    p.add_argument("--steps", type=positive, required=True, help="reasoning steps per request")
    p.add_argument("--step-tokens", type=positive, default=96, help="tokens per step (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt tokens (default: %(default)s)")
    p.add_argument(
        "--final-tokens", type=nonnegative, default=128, help="answer tokens, large pool (default: %(default)s)"
    )
    share = p.add_mutually_exclusive_group(required=True)
    share.add_argument("--large-fraction", type=_number(0, high=1), help="fraction F of steps the large pool writes")
    share.add_argument("--tau", type=nonnegative, help="entropy threshold; F read from --calibration")
    p.add_argument("--calibration", type=Path, help="JSON {taus, large_fraction} from `cluster calibrate --out`")
    p.add_argument(
        "--entropy",
        type=_pair(float, "MU:SIGMA"),
        metavar="MU:SIGMA",
        help="with --tau: each step's first-token entropy is lognormal(MU, SIGMA), the step large above tau",
    )
    p.add_argument(
        "--step-tokens-range",
        type=_pair(int, "LO:HI"),
        metavar="LO:HI",
        help="steps of LO to HI tokens, uniform (instead of --step-tokens each)",
    )
    p.add_argument(
        "--placement",
        choices=("per_request", "aligned", "random"),
        default="per_request",
        help="which steps go large: evenly spaced at each request's phase (default), at one phase for all, "
        "or at random",
    )
    p.add_argument(
        "--gpu", choices=sorted(GPUS), default="h200", help="card the profiles are for (default: %(default)s)"
    )
    p.add_argument(
        "--small-graphs",
        choices=("FULL", "default"),
        default="FULL",
        help="the small engine's CUDA-graph mode (default: %(default)s, the benchmark's)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` command to a CLI; its ``func(args)`` returns the exit code."""
    positive = _number(0, above=True)
    p = subparsers.add_parser(
        "plan", help="cheapest replica mix and layout for a load and a p95 target", description=__doc__.splitlines()[0]
    )
    _request_flags(p)
    p.add_argument("--p95", type=positive, required=True, help="p95 latency target, seconds")
    p.add_argument("--goodput", type=_number(0, above=True, high=1), help="also this share of requests within --bound")
    p.add_argument("--bound", type=positive, help="latency bound of --goodput, seconds")
    p.add_argument("--max-cell-gpus", type=int, default=2, help="largest cell searched, GPUs (default: %(default)s)")
    p.add_argument("--max-gpus", type=int, help="most GPUs the plan may use")
    p.add_argument(
        "--duration", type=positive, default=180.0, help="simulated seconds per trial (default: %(default)s)"
    )
    p.add_argument("--config", help="config file or shipped name: warn where a pool needs more than its max_replicas")
    p.add_argument("--plot", type=Path, metavar="PATH.png", help="plot predicted p95 against load per GPU")
    p.set_defaults(func=cmd_plan)


def register_predict(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` command: the simulator's prediction for one layout, request shape and load."""
    p = subparsers.add_parser(
        "predict",
        help="predicted throughput and latency of a layout at a load",
        description="The simulator's prediction (docs/planning.md) for one layout and load.",
    )
    p.add_argument(
        "--layout",
        required=True,
        help="a benchmark layout (routed-2gpu, shared-2gpu, ...) or a spec: GPUs "
        "separated by commas, each [Kx]ROLE[+ROLE] with s and l, e.g. s,l or 2xs+l or s+s,3xl",
    )
    _request_flags(p)
    p.add_argument(
        "--arm",
        choices=("stream", "fused", "instep", "random", "large"),
        default="stream",
        help="client arm of gpu_bench (large: policy large_only)",
    )
    p.add_argument("--requests", type=int, help="closed loop: requests in all (default: two per slot)")
    p.add_argument(
        "--duration", type=_number(0, above=True), default=600.0, help="open loop: seconds (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_predict)
