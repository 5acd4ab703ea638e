"""Sliding-window limits on a real Redis: no window boundary lets a burst through, refusals say exactly when to
come back, tokens leave the window with the charges that made them."""

from __future__ import annotations

import asyncio

import pytest

from router_service.headers import ratelimit_headers, refusal_headers
from router_service.tenancy import RateLimited, TenantSettings, TenantStore

pytestmark = pytest.mark.redis
WINDOW_S = 1.0


async def redis_ms(store: TenantStore) -> int:
    seconds, micros = await store.redis.time()
    return seconds * 1000 + micros // 1000


async def admit_all(store, tenant, prefix: str, n: int) -> int:
    """Try ``n`` admissions at once; returns how many were let in."""
    admitted = 0
    for i in range(n):
        try:
            await store.admit(tenant, f"{prefix}-{i}")
            admitted += 1
            await store.release(tenant, f"{prefix}-{i}")
        except RateLimited:
            pass
    return admitted


async def test_a_burst_across_a_window_boundary_is_admitted_at_most_at_the_limit(redis_client):
    store = TenantStore(redis_client, window_s=WINDOW_S)
    limit = 10
    tenant, _ = await store.create_tenant(
        "acme", TenantSettings(requests_per_minute=limit, max_concurrent_requests=100)
    )
    # a fixed window would open at each multiple of the window length: send a full burst just before such a
    # boundary and another just after it
    now = await redis_ms(store)
    boundary = (now // store.window_ms + 1) * store.window_ms
    await asyncio.sleep((boundary - now - 100) / 1000)
    before = await admit_all(store, tenant, "before", limit)
    await asyncio.sleep(max(0.0, (boundary + 50 - await redis_ms(store)) / 1000))
    after = await admit_all(store, tenant, "after", limit)
    assert before == limit
    assert after == 0  # the first burst is still inside the sliding window: nothing more until it leaves
    assert before + after <= limit


async def test_a_refusal_says_exactly_when_the_next_request_is_admitted(redis_client):
    store = TenantStore(redis_client, window_s=WINDOW_S)
    tenant, _ = await store.create_tenant("acme", TenantSettings(requests_per_minute=2, max_concurrent_requests=100))
    await store.admit(tenant, "r0")
    await asyncio.sleep(0.3)
    await store.admit(tenant, "r1")
    with pytest.raises(RateLimited) as info:
        await store.admit(tenant, "r2")
    retry = info.value.retry_after_s
    assert info.value.reason == "requests"
    assert 0.6 < retry <= 0.71  # r0 leaves the window 1 s after it came in, ~0.3 s ago
    assert refusal_headers(info.value)["Retry-After"] == "1"
    await asyncio.sleep(retry - 0.05)
    with pytest.raises(RateLimited):  # just before: still refused
        await store.admit(tenant, "r2")
    await asyncio.sleep(0.1)
    admission = await store.admit(tenant, "r2")  # just after: r0 has left, r1 has not
    assert ratelimit_headers(admission.state)["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_leave_the_window_with_their_charges(redis_client):
    store = TenantStore(redis_client, window_s=WINDOW_S)
    tenant, _ = await store.create_tenant("acme", TenantSettings(tokens_per_minute_large=100, requests_per_minute=1000))
    assert await store.charge_tokens(tenant, "large", 70) == 70
    await asyncio.sleep(0.4)
    assert await store.charge_tokens(tenant, "large", 30) == 100
    with pytest.raises(RateLimited) as info:
        await store.admit(tenant, "r1")
    assert info.value.reason == "tokens"
    assert 0.5 < info.value.retry_after_s <= 0.61  # the 70 leave first, 1 s after their charge
    await asyncio.sleep(info.value.retry_after_s + 0.03)
    state = (await store.admit(tenant, "r1")).state
    assert state.remaining_tokens["large"] == 70  # the 30 charged later still count
    assert 0.3 < state.reset_tokens_s <= 0.41
    assert await store.charge_tokens(tenant, "large", 0) == 30
    await asyncio.sleep(0.45)
    assert await store.charge_tokens(tenant, "large", 5) == 5
