"""Rendezvous hashing of request ids onto pool replicas (no Ray is started)."""

from __future__ import annotations

from collections import Counter

from deployments.affinity import rendezvous_pick

KEYS = [f"req-{i}" for i in range(1000)]
REPLICAS = ["r0", "r1", "r2", "r3"]


def picks(replicas: list[str]) -> dict[str, str]:
    return {key: rendezvous_pick(key, replicas) for key in KEYS}


def test_stable_and_order_independent():
    assert picks(REPLICAS) == picks(list(reversed(REPLICAS))) == picks(REPLICAS)
    assert rendezvous_pick("req-1", ["only"]) == "only"


def test_spreads_keys():
    counts = Counter(picks(REPLICAS).values())
    assert set(counts) == set(REPLICAS)
    assert all(180 <= n <= 320 for n in counts.values()), counts  # 250 each expected


def test_adding_or_removing_a_replica_moves_few_keys():
    before = picks(REPLICAS)
    grown = picks(REPLICAS + ["r4"])
    moved = [key for key in KEYS if grown[key] != before[key]]
    assert {grown[key] for key in moved} == {"r4"}  # keys only move to the new replica
    assert 120 <= len(moved) <= 280  # ~1/5 of the keys
    shrunk = picks(["r0", "r1", "r2"])
    assert all(shrunk[key] == before[key] for key in KEYS if before[key] != "r3")  # only r3's keys move
