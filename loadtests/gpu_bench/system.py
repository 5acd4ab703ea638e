"""The system under test on the GPU machine: Redis, Ray nodes owning their GPUs, both pools and the router
(the local launcher's), a tenant without practical limits, and CUDA MPS around a run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from cluster.config import ClusterConfig
from cluster.ops.launcher import LocalNode

DEVICE_ENV = {  # for the Ray nodes the driver starts, and so for the engines
    # Hosts whose GPUs others share may forbid NVLink multicast; vLLM's symmetric-memory all-reduce uses it.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    # A replica that fails to start fails the run at its first try, not its third (GPU time is costly).
    "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1",
}


async def bench_key(cfg: ClusterConfig) -> str:
    """A tenant without practical limits, for the benchmark."""
    import redis.asyncio as aioredis

    from router_service.tenancy import TenantSettings, TenantStore

    client = aioredis.Redis.from_url(cfg.redis.url)
    store = TenantStore(client)
    if await store.get_tenant("bench") is not None:
        await store.delete_tenant("bench")
    _, key = await store.create_tenant(
        "bench",
        TenantSettings(
            policy=cfg.router.policy,
            max_token_budget=100_000,
            requests_per_minute=1_000_000,
            tokens_per_minute_small=1_000_000_000,
            tokens_per_minute_large=1_000_000_000,
            max_concurrent_requests=10_000,
        ),
    )
    await client.aclose()
    return key


async def start(cfg: ClusterConfig, nodes: list[LocalNode]) -> tuple[str, str]:
    """Bring the system up for ``cfg`` on ``nodes`` (blocking while the engines start); returns (base URL, key)."""
    from cluster.ops import launcher

    subprocess.run([sys.executable, "-m", "cluster", "down"], check=False)
    os.environ.update(DEVICE_ENV)
    base = launcher.up(cfg, num_cpus=8, nodes=nodes)
    return base, await bench_key(cfg)


@contextlib.contextmanager
def mps_daemon(enabled: bool):
    """With ``enabled``, run the block under CUDA MPS: start a control daemon for this run (its pipe in a fresh
    folder, named in the environment that Ray and the engines inherit), and afterwards stop the system and then
    the daemon, so that the machine is left as it was. MPS lets the engines that share a GPU run their kernels
    concurrently instead of time-sliced."""
    if not enabled:
        yield
        return
    folder = tempfile.mkdtemp(prefix="mps-")
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY=folder, CUDA_MPS_LOG_DIRECTORY=folder)
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    print(f"CUDA MPS control daemon started (pipe {folder})", flush=True)
    try:
        yield
    except BaseException:
        # printed now: stopping Ray below ends this process (its driver loses the GCS) before Python could
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        subprocess.run([sys.executable, "-m", "cluster", "down"], check=False)
        for log in sorted(Path(folder).glob("*.log")):  # the daemon's own record (clients refused, servers)
            print(f"--- MPS {log.name} (last lines)\n" + "".join(log.read_text().splitlines(True)[-15:]), flush=True)
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", check=False)
        print("CUDA MPS control daemon stopped", flush=True)
