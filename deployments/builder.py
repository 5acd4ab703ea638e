"""The one entry point: ``build_app(config) -> serve.Application``. Pools are bound first, their handles
passed to the router (as Ray Serve LLM's prefill/decode builder does)."""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig, PoolRole, PoolSettings
from deployments.pool import ModelPool, actor_options

DEPLOYMENT_NAMES: dict[PoolRole, str] = {"small": "SmallPool", "large": "LargePool"}
AFFINITY_ROUTER = "deployments.affinity:PrefixAffinityRouter"


def pool_deployment(role: PoolRole, settings: PoolSettings, prefix_affinity: bool) -> serve.Application:
    """One pool as a deployment named by role, with its own autoscaling and placement."""
    options = dict(
        name=DEPLOYMENT_NAMES[role],
        autoscaling_config=settings.autoscaling.to_serve(),
        max_ongoing_requests=settings.autoscaling.max_ongoing_requests,
        ray_actor_options=actor_options(settings),
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30,
    )
    if prefix_affinity:
        options["request_router_config"] = RequestRouterConfig(request_router_class=AFFINITY_ROUTER)
    return serve.deployment(ModelPool).options(**options).bind(role, settings)


def build_app(config: ClusterConfig) -> serve.Application:
    """Bind both pools and the router into one Serve application."""
    from router_service.server import Router

    pools = {role: pool_deployment(role, settings, config.router.prefix_affinity) for role, settings in config.pools.items()}
    router = Router.options(
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.router.num_cpus},
    )
    return router.bind(config.model_dump(mode="json"), pools["small"], pools["large"])


def app_builder(args: dict) -> serve.Application:
    """Ray Serve application builder (``import_path: deployments.builder:app_builder``, ``args: {config: ...}``)."""
    return build_app(ClusterConfig.model_validate(args["config"]))
