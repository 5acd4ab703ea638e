"""Large-step budgets: hold a tenant's share of large-pool steps at its ``max_large_fraction``.

For each tenant (and budget) a router replica keeps the first-token entropies of its recent glimpses. A step's
tau is the quantile of that window above which the budgeted fraction of the entropies lies, so the budget goes
to the tenant's steps of highest entropy, and it follows the tenant's own traffic as it changes. A leaky sum of
the shortfall (budget minus the steps sent large) nudges the fraction the quantile aims at, so sampling noise
does not accumulate: over a hundred steps the share stays within a few points of the budget. Until
``min_samples`` glimpses are seen, the request's own tau decides (the one ``cluster calibrate`` gives for the
budget is the right start). A load offset of the tau controller comes on top and does not count as shortfall:
each step is counted large when its entropy reaches the budget's tau.
"""

from __future__ import annotations

from collections import deque

from cluster.config import LargeStepBudgetSettings, PolicySettings

TIE_NATS = 1e-9  # above the largest entropy seen: no step of the window would go large


class Budget:
    """One tenant's budget: its recent entropies and the leaky sum of its shortfall of large steps."""

    def __init__(self, fraction: float, settings: LargeStepBudgetSettings):
        self.fraction, self.settings = fraction, settings
        self.entropies: deque[float] = deque(maxlen=settings.window)
        self.shortfall = 0.0
        self.steps = 0
        self.large = 0
        self._decay = 1 - 1 / settings.window

    def tau(self, start: float) -> float:
        """The tau of the next step: ``start`` until enough glimpses are seen, then the window's quantile."""
        n = len(self.entropies)
        if n < self.settings.min_samples:
            return start
        aim = min(1.0, max(0.0, self.fraction + self.shortfall / self.settings.feedback_steps))
        k = round(aim * n)  # entropies of the window that would go large
        ordered = sorted(self.entropies)
        if k <= 0:
            return min(10.0, ordered[-1] + TIE_NATS)
        if k >= n:
            return 0.0
        return (ordered[n - k] + ordered[n - k - 1]) / 2

    def record(self, entropy: float, large: bool) -> None:
        """A glimpse's entropy and whether its step went large at the budget's tau."""
        self.entropies.append(entropy)
        self.shortfall = self.shortfall * self._decay + (self.fraction - large)
        self.steps += 1
        self.large += large

    @property
    def share(self) -> float | None:
        """Share of the budget's steps sent large at its tau (None before any)."""
        return self.large / self.steps if self.steps else None


class LargeStepBudgets:
    """The budgets of one router replica, by tenant and fraction; the step loop calls ``steer`` before a
    step's decision and ``observe`` after it."""

    def __init__(self, settings: LargeStepBudgetSettings):
        self.settings = settings
        self.budgets: dict[tuple[str, float], Budget] = {}
        self._steered: dict[str, tuple[Budget, float]] = {}  # request id -> its budget and the tau it got

    def steer(self, tenant: str, request_id: str, policy: PolicySettings) -> PolicySettings:
        """``policy`` with the budget's tau, when the request has a budget and is routed by entropy."""
        fraction = policy.max_large_fraction
        if fraction is None or policy.policy != "glimprouter":
            return policy
        budget = self.budgets.setdefault((tenant, fraction), Budget(fraction, self.settings))
        tau = budget.tau(policy.tau)
        self._steered[request_id] = (budget, tau)
        return policy.model_copy(update={"tau": tau})

    def observe(self, request_id: str, entropy: float | None) -> None:
        """The glimpse's entropy of the step just decided for ``request_id`` (ignored without a budget)."""
        steered = self._steered.pop(request_id, None)
        if steered is not None and entropy is not None:
            budget, tau = steered
            budget.record(entropy, entropy >= tau)

    def forget(self, request_id: str) -> None:
        """The request ended (a step steered but never decided leaves nothing behind)."""
        self._steered.pop(request_id, None)

    def share(self, tenant: str, fraction: float) -> float | None:
        """What this replica's budget of ``tenant`` at ``fraction`` has sent large so far."""
        budget = self.budgets.get((tenant, fraction))
        return budget.share if budget else None
