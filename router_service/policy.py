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


def _glimprouter(entropy: float | None, settings: PolicySettings, draw: float, index: int) -> PoolRole:
    return "large" if entropy is not None and entropy >= settings.tau else "small"


def _large_only(entropy: float | None, settings: PolicySettings, draw: float, index: int) -> PoolRole:
    return "large"


def _small_only(entropy: float | None, settings: PolicySettings, draw: float, index: int) -> PoolRole:
    return "small"


def _random(entropy: float | None, settings: PolicySettings, draw: float, index: int) -> PoolRole:
    return "large" if draw < settings.large_fraction else "small"


def _forced_fraction(entropy: float | None, settings: PolicySettings, draw: float, index: int) -> PoolRole:
    """Benchmarks on random weights (every entropy equal): evenly spaced steps, ``large_fraction`` of them."""
    f = settings.large_fraction
    return "large" if math.floor((index + 1) * f) > math.floor(index * f) else "small"


PolicyFn = Callable[[float | None, PolicySettings, float, int], PoolRole]
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


def seeded_draw(seed: int, request_id: str, step_index: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, request, step): a resumed request redraws the same."""
    digest = hashlib.blake2b(f"{seed}|{request_id}|{step_index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def decide(settings: PolicySettings, top_logprobs: Sequence[float] | None, draw: float, index: int = 0) -> Decision:
    """Route step ``index``: ``top_logprobs`` of the glimpse (None if no glimpse), ``draw`` for 'random'."""
    entropy = first_token_entropy(top_logprobs) if top_logprobs else None
    return Decision(POLICIES[settings.policy](entropy, settings, draw, index), entropy)
