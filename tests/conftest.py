"""Shared fixtures: a real Redis server for the whole session (no Ray needed)."""

from __future__ import annotations

import os
import socket

import pytest

from cluster.ops.redis_server import start_local_redis


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


# ---- the real local cluster (Ray, Redis, vLLM CPU engines), started once per session -------------------


class LocalCluster:
    """Handles on the running local cluster."""

    def __init__(self, config, base_url: str, admin_key: str):
        self.config, self.base_url, self.admin_key = config, base_url, admin_key

    def redis_url(self) -> str:
        return self.config.redis.effective_url()

    def new_tenant(self, name: str, **settings) -> str:
        """Create (or recreate) a tenant with generous limits unless given; returns its key."""
        import asyncio

        import redis.asyncio as aioredis

        from router_service.tenancy import TenantSettings, TenantStore

        async def run():
            client = aioredis.Redis.from_url(self.redis_url())
            store = TenantStore(client)
            if await store.get_tenant(name) is not None:
                await store.delete_tenant(name)
            merged = {
                "requests_per_minute": 10_000,
                "max_concurrent_requests": 100,
                "policy": self.config.router.policy.model_dump(),
                **settings,
            }
            _, key = await store.create_tenant(name, TenantSettings.model_validate(merged))
            await client.aclose()
            return key

        return asyncio.run(run())


def _healthy(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def local_cluster():
    """The local cluster of ``GLIMP_TEST_CONFIG`` (default: the shipped local.yaml): reused if it is up,
    else started here and stopped at the end of the session."""
    import subprocess
    import sys

    import ray

    from cluster.config import load_config
    from cluster.ops.launcher import RUN_DIR

    config_path = os.environ.get("GLIMP_TEST_CONFIG", "local")
    config = load_config(config_path)
    base_url = f"http://{config.router.host}:{config.router.port}"
    started = not _healthy(base_url)
    if started:
        subprocess.run(
            [sys.executable, "-m", "cluster", "up", "--no-sample", "--config", config_path], check=True, timeout=1500
        )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False, ignore_reinit_error=True)
    yield LocalCluster(config, base_url, (RUN_DIR / "admin.key").read_text().strip())
    ray.shutdown()
    if started and not os.environ.get("GLIMP_KEEP_CLUSTER"):
        subprocess.run([sys.executable, "-m", "cluster", "down"], check=False, timeout=120)
