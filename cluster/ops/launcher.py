"""The local cluster: Redis, a Ray head node, and the Serve application, started and stopped in one go.

``python -m cluster up`` prints progress while models convert and each pool's engines start, then the
endpoint; ``python -m cluster down`` stops the application, Ray and the Redis it started.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ClusterConfig
from cluster.ops.models import ensure_embedded_model
from cluster.ops.redis_server import start_local_redis
from cluster.topology import ENGINE_MARKER

RUN_DIR = Path(os.environ.get("GLIMP_RUN_DIR", "run"))
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # this interpreter's Ray CLI, whatever PATH says
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def say(message: str) -> None:
    """Progress on stderr."""
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


DASHBOARD_PORT = 8265
HEAD_METRICS_PORT = 8080  # node i exports Prometheus metrics on HEAD_METRICS_PORT + i
OBJECT_STORE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class LocalNode:
    """One simulated node of the local cluster: its custom resources and the GPUs it owns (device ids)."""

    resources: dict[str, float]
    gpus: tuple[str, ...] = ()


def local_nodes(cfg: ClusterConfig) -> list[LocalNode]:
    """One node per pool's node-pool resource, the head first (it also runs the router and holds every GPU).
    Pools without one are placed wherever Ray likes."""
    names = dict.fromkeys(p.placement.node_resource for _, p in cfg.pools.items() if p.placement.node_resource)
    nodes = [LocalNode({name: 1000.0}) for name in names] or [LocalNode({})]
    nodes[0] = LocalNode(nodes[0].resources, local_gpus())
    return nodes


def local_gpus() -> tuple[str, ...]:
    """NVIDIA GPU ids for the head node: those in CUDA_VISIBLE_DEVICES when set, else all that ``nvidia-smi``
    lists; none without it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return tuple(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
    if shutil.which("nvidia-smi") is None:
        return ()
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return tuple(str(i) for i in range(sum(line.startswith("GPU ") for line in listing.splitlines())))


def start_ray(nodes: list[LocalNode], num_cpus: int) -> None:
    """A local Ray cluster of ``nodes`` (e.g. ``small_pool`` on the head and ``large_pool`` on a second node),
    with the dashboard (Serve's REST API) and a Prometheus endpoint per node. A node sees only its own GPUs."""
    os.environ.update(RAY_ENV)
    status = subprocess.run([*RAY, "status"], capture_output=True, text=True, env=os.environ)
    if status.returncode == 0:
        say("Ray is already running; reusing it")
        return
    for i, node in enumerate(nodes):
        common = [
            f"--num-cpus={num_cpus}",
            f"--num-gpus={len(node.gpus)}",
            f"--resources={json.dumps(node.resources)}",
            f"--metrics-export-port={HEAD_METRICS_PORT + i}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--dashboard-agent-listen-port={52365 + i}",
            "--disable-usage-stats",
        ]
        role = (
            ["--head", f"--dashboard-port={DASHBOARD_PORT}", "--dashboard-host=127.0.0.1"]
            if i == 0
            else ["--address=127.0.0.1:6379"]
        )
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(node.gpus)} if node.gpus else {})}
        say(
            f"starting Ray {'head' if i == 0 else 'worker'} node {i} ({num_cpus} logical CPUs, "
            f"GPUs {list(node.gpus)}, resources {node.resources})"
        )
        subprocess.run([*RAY, "start", *role, *common], check=True, env=env, stdout=subprocess.DEVNULL)


def deploy(cfg: ClusterConfig, timeout_s: float = 900) -> None:
    """Deploy the rendered Serve config through the dashboard (as ``serve deploy`` does, so that a later
    ``cluster scale`` is a light update), and wait until every deployment is healthy, printing each change of
    state or of Serve's message (slow starts; each failed start of a replica with its exception, and the
    deployment's failure once Serve's tries are spent: ``RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT`` on the Ray
    nodes sets how many)."""
    import ray
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from cluster.ops.render import serve_config

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    say(f"deploying application '{cfg.name}' (pools start their vLLM engines; this takes a few minutes on CPU)")
    ServeSubmissionClient(f"http://127.0.0.1:{DASHBOARD_PORT}").deploy_applications(
        serve_config(cfg, proxy_location="HeadOnly")
    )
    start, seen = time.time(), {}
    while time.time() - start < timeout_s:
        app = serve.status().applications.get(cfg.name)
        if app is not None:
            for name, dep in app.deployments.items():
                state = status_name(dep.status)
                if seen.get(name) != (state, dep.message):
                    seen[name] = (state, dep.message)
                    say(progress_line(name, state, dep.message, time.time() - start))
            app_state = status_name(app.status)
            if app_state == "RUNNING":
                say(f"application ready in {time.time() - start:.0f} s")
                return
            if app_state == "DEPLOY_FAILED":
                failed = [
                    f"{name}: {message_summary(dep.message)}"
                    for name, dep in app.deployments.items()
                    if status_name(dep.status) == "DEPLOY_FAILED"
                ]
                raise RuntimeError(f"deployment failed: {app.message} {' '.join(failed)}")
        time.sleep(2)
    raise TimeoutError(f"application not ready after {timeout_s:.0f} s")


def status_name(status) -> str:
    """A Serve status enum's name (``DEPLOY_FAILED``), whatever the Ray version returns."""
    return status.value if hasattr(status, "value") else str(status)


def progress_line(deployment: str, state: str, message: str, elapsed_s: float, width: int = 500) -> str:
    """One line of deploy progress: the deployment's state and, when Serve gives one, its message shortened (see
    ``message_summary``)."""
    detail = message_summary(message)
    line = f"  {deployment}: {state} ({elapsed_s:.0f} s){': ' + detail if detail else ''}"
    return line if len(line) <= width else line[: width - 3] + "..."


def message_summary(message: str) -> str:
    """Serve's status message in one line: its first line and, for a replica that failed to start, the exception
    its traceback ends with (that line and the indented one after it), else the message's last line."""
    lines = [line.rstrip() for line in (message or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0].strip() if lines else ""
    raised = [i for i, line in enumerate(lines) if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    if not raised:
        return f"{lines[0].strip()} ... {lines[-1].strip()}"
    i = raised[-1]
    detail = lines[i] + (f" {lines[i + 1].strip()}" if i + 1 < len(lines) and lines[i + 1].startswith(" ") else "")
    return f"{lines[0].strip()} ... {detail}"


def ensure_admin_key() -> str:
    """The bootstrap admin key: GLIMP_ADMIN_KEY, else the one kept in the run directory, else a new one.
    Exported before Ray starts, so router replicas inherit it."""
    key_file = RUN_DIR / "admin.key"
    key = os.environ.get("GLIMP_ADMIN_KEY") or (key_file.read_text().strip() if key_file.exists() else "")
    key = key or "gr-admin-" + secrets.token_urlsafe(32)
    key_file.write_text(key)
    key_file.chmod(0o600)
    os.environ["GLIMP_ADMIN_KEY"] = key
    return key


def up(cfg: ClusterConfig, num_cpus: int = 8, nodes: list[LocalNode] | None = None) -> str:
    """Start everything on ``nodes`` (default ``local_nodes(cfg)``), ``num_cpus`` logical CPUs each; returns the
    API's base URL."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    for _, pool in cfg.pools.items():
        if pool.model.embedded:
            say(f"model {pool.model.embedded}: {ensure_embedded_model(pool.model.embedded)}")
    url = cfg.redis.effective_url()
    proc = start_local_redis(url, RUN_DIR / "redis")
    if proc is not None:
        (RUN_DIR / "redis.pid").write_text(str(proc.pid))
        say(f"started redis-server at {url}")
    else:
        say(f"using Redis at {url}")
    cfg.redis.url = url
    ensure_admin_key()
    start_ray(nodes or local_nodes(cfg), num_cpus)
    deploy(cfg)
    base = f"http://{cfg.router.host}:{cfg.router.port}"
    say(f"API at {base}/v1 (OpenAI-compatible; model '{cfg.name}')")
    return base


def down() -> None:
    """Stop the Serve application, Ray and the Redis this launcher started."""
    os.environ.update(RAY_ENV)
    say("stopping Ray (and Serve)")
    subprocess.run([*RAY, "stop", "--force"], env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped = kill_engine_processes()
    if stopped:
        say(f"stopped {stopped} leftover vLLM engine processes")
    pid_file = RUN_DIR / "redis.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            say("stopped redis-server")
        except ProcessLookupError:
            pass
        pid_file.unlink()


def kill_engine_processes() -> int:
    """Kill vLLM engine processes of this machine's pools that outlived their Ray worker (engine cores
    are separate processes; a replica killed by Ray leaves them behind). They carry ``ENGINE_MARKER``."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and ENGINE_MARKER in proc.environ():
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return killed
