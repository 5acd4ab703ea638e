"""Routing policies: first-token entropy, the per-policy decision, seeded draws."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cluster.config import PolicySettings
from router_service import policy
from router_service.policy import decide, first_token_entropy, needs_glimpse, seeded_draw


@pytest.mark.parametrize("logprobs, expected", [
    ([math.log(1 / 20)] * 20, math.log(20)),            # uniform over k: ln k
    ([-3.0] * 4, math.log(4)),                           # renormalised: the level does not matter
    ([0.0], 0.0),                                        # one-hot
    ([0.0] + [-1e4] * 19, 0.0),
    ([math.log(0.5)] * 2 + [-1e4] * 18, math.log(2)),    # two equal, the rest negligible
    ([math.log(0.75), math.log(0.25)], -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),  # nats
    ([math.log(0.3), math.log(0.1)], -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),    # renormalised to .75/.25
])
def test_entropy(logprobs, expected):
    assert first_token_entropy(logprobs) == pytest.approx(expected, abs=1e-12)


def test_entropy_is_shift_invariant_and_needs_input():
    lps = [-0.1, -2.5, -3.0, -7.2]
    for shift in (-40.0, 5.0):
        assert first_token_entropy([lp + shift for lp in lps]) == pytest.approx(first_token_entropy(lps), abs=1e-12)
    with pytest.raises(ValueError):
        first_token_entropy([])


def test_glimprouter_threshold():
    lps = [-0.2, -1.9, -3.1]
    h = first_token_entropy(lps)
    at = decide(PolicySettings(tau=h), lps, 0.5)
    assert (at.pool, at.entropy) == ("large", h)                       # H >= tau -> large
    assert decide(PolicySettings(tau=math.nextafter(h, 10)), lps, 0.5).pool == "small"  # H just below tau
    assert decide(PolicySettings(tau=0.0), [0.0], 0.5).pool == "large"  # H = 0 = tau
    assert decide(PolicySettings(tau=0.0), None, 0.5) == policy.Decision("small", None)  # no glimpse


@pytest.mark.parametrize("name, pool", [("large_only", "large"), ("small_only", "small")])
def test_fixed_policies(name, pool):
    settings = PolicySettings(policy=name, tau=0.0)
    for lps, draw in [([0.0] * 20, 0.0), ([0.0, -50.0], 0.99), (None, 0.5)]:
        assert decide(settings, lps, draw).pool == pool


def test_random_policy_fraction():
    draws = [seeded_draw(7, "req-x", i) for i in range(4000)]

    def large_share(fraction: float) -> float:
        settings = PolicySettings(policy="random", large_fraction=fraction)
        return sum(decide(settings, None, d).pool == "large" for d in draws) / len(draws)

    assert large_share(0.0) == 0.0
    assert large_share(1.0) == 1.0
    assert abs(large_share(0.25) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)  # ~0.027, deterministic draws


def test_seeded_draw():
    draw = seeded_draw(3, "req-1", 4)
    assert 0.0 <= draw < 1.0
    assert seeded_draw(3, "req-1", 4) == draw
    assert len({draw, seeded_draw(4, "req-1", 4), seeded_draw(3, "req-2", 4), seeded_draw(3, "req-1", 5)}) == 4


def test_seeded_draw_below_one_for_largest_digest(monkeypatch):
    digest = SimpleNamespace(digest=lambda: b"\xff" * 8)
    monkeypatch.setattr(policy, "hashlib", SimpleNamespace(blake2b=lambda *a, **k: digest))
    assert seeded_draw(0, "r", 0) < 1.0


def test_needs_glimpse():
    assert [needs_glimpse(PolicySettings(policy=p)) for p in ("glimprouter", "large_only", "small_only", "random")] \
        == [True, False, False, False]


def test_forced_fraction_spaces_large_steps_evenly_and_still_glimpses():
    settings = PolicySettings(policy="forced_fraction", large_fraction=0.25)
    pools = [decide(settings, [-1.0, -2.0], 0.0, index).pool for index in range(24)]
    assert [i for i, p in enumerate(pools) if p == "large"] == [3, 7, 11, 15, 19, 23]
    assert needs_glimpse(settings)
