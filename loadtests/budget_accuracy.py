"""How closely a large-step budget is held, on synthetic glimpses (no cluster): for each budget and seed, 100
steps of a tenant whose first-token entropies spread over (0, ln 20) go through ``router_service/budgets.py``
from a starting tau that alone would send over half of them large; prints the share got against the budget.

    python -m loadtests.budget_accuracy [--seeds 200] [--steps 100] [--start-tau 1.0]

The entropies come from top-20 log-probs with one most likely token and 19 others a uniform 0-8 nats below it,
the distribution the unit test uses (``tests/test_tenants_saturation.py``). It measures the controller alone:
real glimpses are neither independent nor stationary, which only the cluster shows.
"""

from __future__ import annotations

import argparse
import random

from cluster.config import LargeStepBudgetSettings
from router_service.budgets import Budget
from router_service.policy import first_token_entropy


def synthetic_entropies(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [first_token_entropy([0.0] + [-rng.uniform(0.0, 8.0)] * 19) for _ in range(n)]


def share_got(fraction: float, entropies: list[float], start_tau: float, settings: LargeStepBudgetSettings) -> float:
    budget, large = Budget(fraction, settings), 0
    for h in entropies:
        sent = h >= budget.tau(start_tau)
        budget.record(h, sent)
        large += sent
    return large / len(entropies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--start-tau", type=float, default=1.0)
    parser.add_argument("--budgets", default="0.1,0.25,0.5")
    opts = parser.parse_args(argv)
    settings = LargeStepBudgetSettings()
    print(
        f"{opts.seeds} tenants x {opts.steps} steps, start tau {opts.start_tau}, window {settings.window}, "
        f"min_samples {settings.min_samples}, feedback_steps {settings.feedback_steps}"
    )
    print("budget  tau-alone share  mean share got  worst |got - budget|  runs off by > 5 points")
    for fraction in (float(f) for f in opts.budgets.split(",")):
        alone, got = [], []
        for seed in range(opts.seeds):
            entropies = synthetic_entropies(opts.steps, seed)
            alone.append(sum(h >= opts.start_tau for h in entropies) / len(entropies))
            got.append(share_got(fraction, entropies, opts.start_tau, settings))
        worst = max(abs(g - fraction) for g in got)
        off = sum(abs(g - fraction) > 0.05 + 1e-9 for g in got)
        print(
            f"{fraction:6.2f}  {sum(alone) / len(alone):15.3f}  {sum(got) / len(got):14.3f}  {worst:19.3f}  {off:22d}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
