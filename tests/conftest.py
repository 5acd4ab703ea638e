"""Shared fixtures: a real Redis server for the whole session (no Ray needed)."""

from __future__ import annotations

import os
import socket

import pytest

from cluster.redis_server import start_local_redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """URL of a real Redis: TEST_REDIS_URL if set, else a fresh redis-server on a free port (db 15)."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    url = f"redis://127.0.0.1:{_free_port()}/15"
    proc = start_local_redis(url, tmp_path_factory.mktemp("redis"))
    yield url
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def redis_client(redis_url):
    """An asyncio Redis client on a flushed database."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    await client.flushdb()
    yield client
    await client.aclose()
