"""Request step state on a real Redis: atomic, owner-checked, in-order appends; leases; TTLs; tenants."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from cluster.config import PolicySettings, StepSettings
from router_service.state import (
    CANCELLED,
    FINISHED,
    RequestNotFound,
    RequestStateStore,
    StateConflict,
    StepRecord,
    StoredRequest,
)

pytestmark = pytest.mark.redis
T = "acme"
KEY = f"glimp:t:{T}:req:r1"


def req(model: str = "m") -> StoredRequest:
    return StoredRequest(
        endpoint="chat",
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        policy=PolicySettings(),
        steps=StepSettings(),
        temperature=0.0,
        top_p=1.0,
    )


def rec(index: int, pool: str = "small", tokens: int = 3, text: str | None = None) -> StepRecord:
    return StepRecord(index, pool, 0.5, text or f"step {index}", tokens, 10, 4, 1.5, 20.0, "stop")


@pytest.fixture
async def store(redis_client):
    return RequestStateStore(redis_client, ttl_s=600)


@pytest.fixture
async def started(store):
    """Request r1 owned by 'a', with step 0 appended."""
    await store.create(T, "r1", req("m"), owner="a")
    assert await store.append_step(T, "r1", "a", rec(0), glimpsed=True) == 1
    return store


async def test_round_trip(started, redis_client):
    assert await started.append_step(T, "r1", "a", rec(1, "large", tokens=7), glimpsed=False) == 2
    await started.finish(T, "r1", "a", {"text": "42"})
    state = await started.get(T, "r1")
    assert (state.request, state.status, state.owner, state.final, state.error) == (
        req("m"),
        FINISHED,
        "a",
        {"text": "42"},
        None,
    )
    assert state.steps == [rec(0), rec(1, "large", tokens=7)]
    assert state.glimpses == 1
    counters = await redis_client.hmget(KEY, "steps_small", "steps_large", "output_tokens_small", "output_tokens_large")
    assert counters == [b"1", b"1", b"3", b"7"]
    assert "owner" not in state.trace() and state.trace()["steps"][1]["pool"] == "large"


@pytest.mark.parametrize("owner, index", [("a", 0), ("a", 2), ("b", 1)])
async def test_append_refused_leaves_steps(started, owner, index):
    with pytest.raises(StateConflict):
        await started.append_step(T, "r1", owner, rec(index), glimpsed=True)
    state = await started.get(T, "r1")
    assert state.steps == [rec(0)] and state.glimpses == 1


async def test_duplicate_create_refused(started):
    with pytest.raises(StateConflict):
        await started.create(T, "r1", req("other"), owner="b")
    state = await started.get(T, "r1")
    assert (state.request, state.owner, state.steps) == (req("m"), "a", [rec(0)])


async def test_claim_waits_for_lease(redis_client):
    store = RequestStateStore(redis_client, ttl_s=600, lease_s=0.2)
    await store.create(T, "r1", req(), owner="a")
    with pytest.raises(StateConflict):
        await store.claim(T, "r1", "b")
    await store.claim(T, "r1", "a")  # the owner renews
    await asyncio.sleep(0.3)
    await store.claim(T, "r1", "b")
    with pytest.raises(StateConflict):  # the old owner lost the request
        await store.append_step(T, "r1", "a", rec(0), glimpsed=False)
    await store.append_step(T, "r1", "b", rec(0), glimpsed=False)
    assert (await store.get(T, "r1")).owner == "b"
    with pytest.raises(RequestNotFound):
        await store.claim(T, "missing", "b")


async def test_end_only_by_owner_and_once(started):
    for end in (
        lambda o: started.finish(T, "r1", o, {"text": "x"}),
        lambda o: started.fail(T, "r1", o, CANCELLED, "gone"),
    ):
        with pytest.raises(StateConflict):
            await end("b")
    await started.fail(T, "r1", "a", CANCELLED, "client gone")
    for end in (
        lambda: started.finish(T, "r1", "a", {"text": "x"}),
        lambda: started.fail(T, "r1", "a", "failed", "boom"),
        lambda: started.claim(T, "r1", "a"),
        lambda: started.append_step(T, "r1", "a", rec(1), False),
    ):
        with pytest.raises(StateConflict):
            await end()
    state = await started.get(T, "r1")
    assert (state.status, state.error, state.final, len(state.steps)) == (CANCELLED, "client gone", None, 1)


async def test_ttl_on_both_keys(started, redis_client):
    for key in (KEY, KEY + ":steps"):
        assert 590 <= await redis_client.ttl(key) <= 600


async def test_tenant_isolation(started):
    with pytest.raises(RequestNotFound):
        await started.get("other", "r1")
    await started.create(T, "r2", req(), owner="a")
    await started.create("other", "r1", req("theirs"), owner="z")
    assert await started.list_ids(T) == (["r2", "r1"], False)  # newest first
    assert await started.list_ids(T, limit=1) == (["r2"], True)
    assert await started.list_ids("other") == (["r1"], False)
    assert await started.list_ids("nobody") == ([], False)
    assert (await started.list_ids(None))[0] == ["other/r1", f"{T}/r2", f"{T}/r1"]  # every tenant's, for the admin
    assert await started.tenant_of("r2") == T and await started.tenant_of("r1") == T  # r1: the first tenant's
    assert (await started.get(T, "r1")).request == req("m")
    assert (await started.get("other", "r1")).steps == []


async def test_concurrent_appends_one_wins(started, redis_url):
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        stores = [RequestStateStore(c, ttl_s=600) for c in clients]
        results = await asyncio.gather(
            *(s.append_step(T, "r1", "a", rec(1, text=f"from store {i}"), glimpsed=True) for i, s in enumerate(stores)),
            return_exceptions=True,
        )
    finally:
        for c in clients:
            await c.aclose()
    assert sorted(type(r).__name__ for r in results) == ["StateConflict", "int"]
    state = await started.get(T, "r1")
    assert len(state.steps) == 2 and state.glimpses == 2 and state.steps[1].text.startswith("from store")
