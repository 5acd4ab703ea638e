"""The one entry point: ``build_app(config) -> serve.Application``. Pools are bound first, their handles
passed to the router (as Ray Serve LLM's prefill/decode builder does); every deployment's options come from
``cluster/topology.py``, as the rendered Serve config's do."""

from __future__ import annotations

from ray import serve

from cluster.config import ClusterConfig
from cluster.topology import pool_options, router_options
from deployments.pool import ModelPool
from router_service.api import Router


def build_app(config: ClusterConfig) -> serve.Application:
    """Bind both pools and the router into one Serve application."""
    pools = {
        role: serve.deployment(ModelPool)
        .options(**pool_options(role, settings, config.router.prefix_affinity))
        .bind(role, settings)
        for role, settings in config.pools.items()
    }
    return Router.options(**router_options(config)).bind(config.model_dump(mode="json"), pools["small"], pools["large"])


def app_builder(args: dict) -> serve.Application:
    """Ray Serve application builder (``import_path: cluster.ops.builder:app_builder``, ``args: {config: ...}``)."""
    return build_app(ClusterConfig.model_validate(args["config"]))
