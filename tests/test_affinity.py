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
    grown = picks([*REPLICAS, "r4"])
    moved = [key for key in KEYS if grown[key] != before[key]]
    assert {grown[key] for key in moved} == {"r4"}  # keys only move to the new replica
    assert 120 <= len(moved) <= 280  # ~1/5 of the keys
    shrunk = picks(["r0", "r1", "r2"])
    assert all(shrunk[key] == before[key] for key in KEYS if before[key] != "r3")  # only r3's keys move


class Replica:
    def __init__(self, rid: str):
        self.replica_id = type("ReplicaID", (), {"unique_id": rid})()


class Pending:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


async def choose(replicas, pending, monkeypatch):
    """PrefixAffinityRouter's ranking over ``replicas``, its power-of-two fallback replaced by a fixed one."""
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    from deployments.affinity import PrefixAffinityRouter

    async def fallback(self, candidates, pending_request=None):
        return [[candidates[-1]]]

    monkeypatch.setattr(PowerOfTwoChoicesRequestRouter, "choose_replicas", fallback)
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # no Serve controller: only the ranking runs
    return await router.choose_replicas(replicas, pending)


async def test_router_sends_a_keyed_call_to_the_key_s_replica_first(monkeypatch):
    replicas = [Replica(r) for r in REPLICAS]
    for key in ("req-1", "req-2", "req-3"):
        ranked = await choose(replicas, Pending(affinity_key=key), monkeypatch)
        assert ranked[0][0].replica_id.unique_id == rendezvous_pick(key, REPLICAS)
        assert ranked[1:] == [[replicas[-1]]]  # then the load-based choice


async def test_router_routes_unkeyed_calls_by_load_alone(monkeypatch):
    replicas = [Replica(r) for r in REPLICAS]
    assert await choose(replicas, Pending(), monkeypatch) == [[replicas[-1]]]
    assert await choose(replicas, None, monkeypatch) == [[replicas[-1]]]
