"""Routing policies: first-token entropy, the per-policy decision, seeded draws."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest

from cluster.config import PolicySettings
from router_service import policy
from router_service.policy import decide, first_token_entropy, needs_glimpse, seeded_draw


@pytest.mark.parametrize(
    "logprobs, expected",
    [
        ([math.log(1 / 20)] * 20, math.log(20)),  # uniform over k: ln k
        ([-3.0] * 4, math.log(4)),  # renormalised: the level does not matter
        ([0.0], 0.0),  # one-hot
        ([0.0] + [-1e4] * 19, 0.0),
        ([math.log(0.5)] * 2 + [-1e4] * 18, math.log(2)),  # two equal, the rest negligible
        ([math.log(0.75), math.log(0.25)], -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),  # nats
        ([math.log(0.3), math.log(0.1)], -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),  # renormalised to .75/.25
    ],
)
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
    at = decide(PolicySettings(tau=h), lps, "req")
    assert (at.pool, at.entropy) == ("large", h)  # H >= tau -> large
    assert decide(PolicySettings(tau=math.nextafter(h, 10)), lps, "req").pool == "small"  # H just below tau
    assert decide(PolicySettings(tau=0.0), [0.0], "req").pool == "large"  # H = 0 = tau
    assert decide(PolicySettings(tau=0.0), None, "req") == policy.Decision("small", None)  # no glimpse


@pytest.mark.parametrize("name, pool", [("large_only", "large"), ("small_only", "small")])
def test_fixed_policies(name, pool):
    settings = PolicySettings(policy=name, tau=0.0)
    for index, lps in enumerate([[0.0] * 20, [0.0, -50.0], None]):
        assert decide(settings, lps, "req", index).pool == pool


def test_random_policy_fraction():
    def large_share(fraction: float) -> float:
        settings = PolicySettings(policy="random", large_fraction=fraction, seed=7)
        return sum(decide(settings, None, "req-x", i).pool == "large" for i in range(4000)) / 4000

    assert large_share(0.0) == 0.0
    assert large_share(1.0) == 1.0
    assert abs(large_share(0.25) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)  # ~0.027, deterministic draws


def test_seeded_draw():
    draw = seeded_draw(3, "req-1", 4)
    assert seeded_draw(3, "req-1") not in (draw, seeded_draw(3, "req-1", 0))  # the request's own draw
    assert 0.0 <= draw < 1.0
    assert seeded_draw(3, "req-1", 4) == draw
    assert len({draw, seeded_draw(4, "req-1", 4), seeded_draw(3, "req-2", 4), seeded_draw(3, "req-1", 5)}) == 4


def test_seeded_draw_below_one_for_largest_digest(monkeypatch):
    digest = SimpleNamespace(digest=lambda: b"\xff" * 8)
    monkeypatch.setattr(policy, "hashlib", SimpleNamespace(blake2b=lambda *a, **k: digest))
    assert seeded_draw(0, "r", 0) < 1.0


def test_needs_glimpse():
    assert [needs_glimpse(PolicySettings(policy=p)) for p in ("glimprouter", "large_only", "small_only", "random")] == [
        True,
        False,
        False,
        False,
    ]


def test_forced_fraction_spaces_large_steps_evenly_at_a_phase_per_request_and_still_glimpses():
    settings = PolicySettings(policy="forced_fraction", large_fraction=0.25)

    def large_steps(request_id: str) -> list[int]:
        return [i for i in range(24) if decide(settings, [-1.0, -2.0], request_id, i).pool == "large"]

    schedules = [large_steps(f"req-{n}") for n in range(40)]
    for steps in schedules:
        assert len(steps) == 6 and {b - a for a, b in itertools.pairwise(steps)} == {4}  # every fourth step
    assert {steps[0] for steps in schedules} == {0, 1, 2, 3}  # requests differ in phase
    assert large_steps("req-0") == schedules[0]  # fixed by the request: a resumed request routes the same
    assert needs_glimpse(settings)
