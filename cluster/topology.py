"""The application's topology, defined once: deployment names, each deployment's Serve options, the engines'
environment, and where each pool's model folder is.

The builder (``cluster/ops/builder.py``) binds deployments with these options and the renderer
(``cluster/ops/render.py``) writes the same options into the Serve config, so the two cannot disagree.
Nothing here imports Ray or another package of the project but the config tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.config import ClusterConfig
from cluster.pool_config import PoolRole, PoolSettings

DEPLOYMENT_NAMES: dict[PoolRole, str] = {"small": "SmallPool", "large": "LargePool"}
ROUTER_DEPLOYMENT = "Router"
BUILDER = "cluster.ops.builder:app_builder"  # the Serve application builder (import path)
AFFINITY_ROUTER = "deployments.affinity:PrefixAffinityRouter"  # the pools' request router class
ENGINE_MARKER = "GLIMP_POOL_ENGINE"  # set in every engine process, so the launcher can find leftovers
POOL_HEALTH_CHECK_PERIOD_S = 10
POOL_HEALTH_CHECK_TIMEOUT_S = 30
POOL_GRACEFUL_SHUTDOWN_TIMEOUT_S = 30


def engine_env(settings: PoolSettings) -> dict[str, str]:
    """Environment variables the engine process needs (CPU KV cache and thread binding; no hub access
    for local models)."""
    env = {"TOKENIZERS_PARALLELISM": "false", ENGINE_MARKER: "1"}
    if settings.model.embedded or settings.model.load_format == "dummy":
        env["HF_HUB_OFFLINE"] = "1"
    if settings.engine.kv_cache_gib is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.engine.kv_cache_gib)
    if settings.engine.cpu_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.engine.cpu_threads_bind
    return env


def actor_options(settings: PoolSettings) -> dict:
    """A pool replica's Ray actor options: its placement and its engine's environment."""
    return {**settings.placement.ray_actor_options(), "runtime_env": {"env_vars": engine_env(settings)}}


def pool_options(role: PoolRole, settings: PoolSettings, prefix_affinity: bool) -> dict:
    """One pool's Serve deployment options (named by role, its own autoscaling and placement)."""
    options = {
        "name": DEPLOYMENT_NAMES[role],
        "max_ongoing_requests": settings.autoscaling.max_ongoing_requests,
        "autoscaling_config": settings.autoscaling.to_serve(),
        "ray_actor_options": actor_options(settings),
        "health_check_period_s": POOL_HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": POOL_HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": POOL_GRACEFUL_SHUTDOWN_TIMEOUT_S,
    }
    if prefix_affinity:
        options["request_router_config"] = {"request_router_class": AFFINITY_ROUTER}
    return options


def router_options(cfg: ClusterConfig, router_resource: str | None = None) -> dict:
    """The Router (ingress) deployment's Serve options. With ``router_resource`` (Kubernetes: a custom resource
    only the router pods advertise, one unit each), each replica takes one unit of it and at most one runs per
    node."""
    options = {
        "name": ROUTER_DEPLOYMENT,
        "num_replicas": cfg.router.num_replicas,
        "max_ongoing_requests": cfg.router.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.router.num_cpus},
    }
    if router_resource:
        options["max_replicas_per_node"] = 1
        options["ray_actor_options"]["resources"] = {router_resource: 1}
    return options


def deployment_options(cfg: ClusterConfig, router_resource: str | None = None) -> list[dict]:
    """Every deployment's options, pools first: what the builder binds and the Serve config lists."""
    pools = [pool_options(role, pool, cfg.router.prefix_affinity) for role, pool in cfg.pools.items()]
    return [*pools, router_options(cfg, router_resource)]


def model_cache_dir() -> Path:
    """Where converted embedded models live: $GLIMP_MODEL_CACHE, else ~/.cache/glimprouter/models."""
    return Path(os.environ.get("GLIMP_MODEL_CACHE", Path.home() / ".cache" / "glimprouter" / "models"))


def model_dir(settings: PoolSettings) -> str:
    """The folder (or hub id) vLLM loads. An embedded model's folder is in the model cache; the launcher
    converts it there before the pools start (``python -m cluster.ops.models``)."""
    if settings.model.embedded:
        return str(model_cache_dir() / settings.model.embedded)
    return str(settings.model.path)


def tokenizer_dir(settings: PoolSettings) -> str:
    """The tokenizer folder: the configured one, else the model's."""
    return settings.model.tokenizer or model_dir(settings)
