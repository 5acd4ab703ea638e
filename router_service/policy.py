"""Routing policies: pure functions from a step's first-token log-probs to the pool that writes it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.config import PolicySettings, PoolRole


def first_token_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy (nats) of the top-k distribution renormalised to sum to one; in [0, ln k]."""
    if not top_logprobs:
        raise ValueError("entropy needs at least one log-prob")
    peak = max(top_logprobs)
    weights = [math.exp(lp - peak) for lp in top_logprobs]
    total = sum(weights)
    return max(0.0, -sum((w / total) * math.log(w / total) for w in weights if w > 0))


@dataclass(frozen=True)
class Decision:
    """Which pool writes a step, and the entropy that decided it (None when no glimpse was taken)."""

    pool: PoolRole
    entropy: float | None


@dataclass(frozen=True)
class StepDraw:
    """What a policy sees of a step besides its settings: the glimpse's entropy (None without one), the step's
    index, and uniform draws (made only when a policy reads them) fixed by (seed, request, step) and by (seed,
    request) alone."""

    entropy: float | None
    index: int
    seed: int
    request_id: str

    @property
    def draw(self) -> float:
        return seeded_draw(self.seed, self.request_id, self.index)

    @property
    def request_draw(self) -> float:
        return seeded_draw(self.seed, self.request_id)


def _glimprouter(step: StepDraw, settings: PolicySettings) -> PoolRole:
    return "large" if step.entropy is not None and step.entropy >= settings.tau else "small"


def _large_only(step: StepDraw, settings: PolicySettings) -> PoolRole:
    return "large"


def _small_only(step: StepDraw, settings: PolicySettings) -> PoolRole:
    return "small"


def _random(step: StepDraw, settings: PolicySettings) -> PoolRole:
    return "large" if step.draw < settings.large_fraction else "small"


def _forced_fraction(step: StepDraw, settings: PolicySettings) -> PoolRole:
    """Benchmarks on random weights (every entropy equal): ``large_fraction`` of the steps, evenly spaced, at a
    phase of the request's own, so that requests started together do not all write their large steps at once."""
    f, phase = settings.large_fraction, step.request_draw
    return "large" if math.floor((step.index + 1) * f + phase) > math.floor(step.index * f + phase) else "small"


PolicyFn = Callable[[StepDraw, PolicySettings], PoolRole]
POLICIES: dict[str, PolicyFn] = {
    "glimprouter": _glimprouter,
    "large_only": _large_only,
    "small_only": _small_only,
    "random": _random,
    "forced_fraction": _forced_fraction,
}


def needs_glimpse(settings: PolicySettings) -> bool:
    """glimprouter reads the first-token distribution; forced_fraction takes the glimpse too (its cost is
    what a benchmark measures) but ignores it; the baselines skip the call."""
    return settings.policy in ("glimprouter", "forced_fraction")


def seeded_draw(seed: int, request_id: str, step_index: int | None = None) -> float:
    """A uniform draw in [0, 1) fixed by (seed, request, step), or by (seed, request) without a step: a resumed
    request redraws the same."""
    key = f"{seed}|{request_id}" if step_index is None else f"{seed}|{request_id}|{step_index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def decide(settings: PolicySettings, top_logprobs: Sequence[float] | None, request_id: str, index: int = 0) -> Decision:
    """Route step ``index`` of request ``request_id``: ``top_logprobs`` of the glimpse (None if no glimpse)."""
    entropy = first_token_entropy(top_logprobs) if top_logprobs else None
    return Decision(POLICIES[settings.policy](StepDraw(entropy, index, settings.seed, request_id), settings), entropy)
