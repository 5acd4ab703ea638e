"""Prefix-cache affinity: every call of one request to a pool goes to the same replica while it lives.

A Ray Serve request router. Calls that carry an ``affinity_key`` keyword go first to the replica that
rendezvous hashing picks for the key among the live replicas (so keys move only when replicas come or
go); if that replica is full, the usual power-of-two choice applies. Calls without a key are routed as
usual.
"""

from __future__ import annotations

import hashlib

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica


def rendezvous_pick(key: str, replica_ids: list[str]) -> str:
    """The replica id with the highest hash of (key, id): stable while that replica lives."""
    return max(replica_ids, key=lambda rid: hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest())


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Routes by ``affinity_key`` (the request id) first, load second."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity_key") if pending_request is not None else None
        fallback = await super().choose_replicas(candidate_replicas, pending_request)
        if not key or not candidate_replicas:
            return fallback
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        preferred = by_id[rendezvous_pick(key, list(by_id))]
        return [[preferred], *fallback]
