"""The GPU benchmark's layouts, as data: which pools run on which local Ray node and GPUs, and the config
changes each needs; ``layout`` builds the config and the nodes for one. Settings come from
``cluster/configs/gpu-bench.yaml``; ``--set`` overrides any field last (a lever under test)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from cluster.config import ClusterConfig, ConfigError, format_validation_error, load_config, set_fields
from cluster.ops.launcher import LocalNode, local_gpus

GPU0, GPU1, BOTH = (0,), (1,), (0, 1)
Hosts = list[tuple[dict[str, int], tuple[int, ...]]]  # (replicas of each pool on a local Ray node, its GPUs)


@dataclass(frozen=True)
class Layout:
    """What a layout places where, its local Ray nodes, and its ``{dotted.path: value}`` config changes (set
    before the model folders are made absolute, so a layout may name another model folder)."""

    placement: str
    hosts: Hosts
    changes: dict = field(default_factory=dict)


# each pool with GPUs of its own: one GPU, most of its memory, a larger KV cache than when sharing
OWN_GPU = {
    "pools.small.placement.num_gpus": 1,
    "pools.small.engine.gpu_memory_utilization": 0.85,
    "pools.small.engine.kv_cache_gib": 16,
    "pools.large.placement.num_gpus": 1,
    "pools.large.engine.gpu_memory_utilization": 0.85,
    "pools.large.engine.kv_cache_gib": 40,
}
LAYOUTS = {
    "one-gpu": Layout("both pools on one GPU (the single-stream layout)", [({"small": 1, "large": 1}, GPU0)]),
    "routed-2gpu": Layout(
        "small pool on GPU 0, large pool on GPU 1", [({"small": 1}, GPU0), ({"large": 1}, GPU1)], OWN_GPU
    ),
    "shared-2gpu": Layout(
        "one small and one large replica on each GPU",
        [({"small": 1, "large": 1}, GPU0), ({"small": 1, "large": 1}, GPU1)],
    ),
    # two small engines share GPU 0: each its own scheduler process
    "routed-dp-2gpu": Layout(
        "two small replicas on GPU 0 (data parallel), the large pool on GPU 1",
        [({"small": 2}, GPU0), ({"large": 1}, GPU1)],
        {
            **OWN_GPU,
            "pools.small.placement.num_gpus": 0.5,
            "pools.small.engine.gpu_memory_utilization": 0.4,
            "pools.small.engine.kv_cache_gib": 12,
        },
    ),
    "large-only-2gpu": Layout(
        "one large replica on each GPU, policy large_only",
        [({"large": 1}, GPU0), ({"large": 1}, GPU1)],
        {
            **OWN_GPU,
            "pools.small.autoscaling.min_replicas": 0,
            "pools.small.autoscaling.max_replicas": 1,
            "pools.small.autoscaling.initial_replicas": 0,
            "router.policy": {"policy": "large_only"},
        },
    ),
    # NCCL all-reduce: with vLLM's custom one an H200 pair failed the engine's first pass
    "tp2-32b-2gpu": Layout(
        "the large pool as Qwen2.5-32B over both GPUs (tensor parallel 2), a small replica on each GPU",
        [({"small": 1}, GPU0), ({"small": 1}, GPU1), ({"large": 1}, BOTH)],
        {
            "pools.large.model.path": "qwen2.5-32b",
            "pools.large.engine.tensor_parallel_size": 2,
            "pools.large.engine.gpu_memory_utilization": 0.75,
            "pools.large.engine.kv_cache_gib": 20,
            "pools.large.engine.disable_custom_all_reduce": True,
            "pools.large.placement.num_gpus": 2,
        },
    ),
}


def layout(
    name: str, steps: int, models_dir: Path, overrides: dict | None = None
) -> tuple[ClusterConfig, list[LocalNode]]:
    """The benchmark config and local Ray nodes (each advertising the pools it hosts, owning its GPUs) for
    ``name``, with ``steps`` steps per request, absolute model folders and ``{dotted.path: value}`` overrides
    set last."""
    spec = LAYOUTS[name]
    data = set_fields(load_config("gpu-bench").model_dump(mode="json", exclude_none=True), spec.changes)
    for pool in data["pools"].values():
        for key in ("path", "tokenizer"):
            pool["model"][key] = str(models_dir.resolve() / Path(pool["model"][key]).name)
    data["router"]["steps"]["token_budget"] = steps * data["router"]["steps"]["step_max_tokens"]
    for role, pool in data["pools"].items():
        pool["placement"].update(node_resource=f"{role}_pool", node_resource_units=1)
        if (replicas := sum(pools.get(role, 0) for pools, _ in spec.hosts)) > 1:
            pool["autoscaling"].update(min_replicas=replicas, max_replicas=replicas)
    gpus = local_gpus()
    nodes = [
        LocalNode({f"{role}_pool": float(n) for role, n in pools.items()}, tuple(gpus[i] for i in owned))
        for pools, owned in spec.hosts
    ]
    return with_overrides(data, overrides or {}, f"layout {name}"), nodes


def with_overrides(data: dict, overrides: dict, what: str) -> ClusterConfig:
    """The config ``data`` with ``{dotted.path: value}`` overrides set, validated (``what`` names it in the
    error)."""
    try:
        return ClusterConfig.model_validate(set_fields(data, overrides))
    except ValidationError as exc:
        raise ConfigError(f"{what}: invalid config\n{format_validation_error(exc)}") from exc


def parse_override(text: str) -> tuple[str, object]:
    """``dotted.path=value`` (the value parsed as YAML) as a (path, value) pair."""
    import yaml

    path, sep, value = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected dotted.path=value, got {text!r}")
    return path, yaml.safe_load(value)


def tag(overrides: dict) -> str:
    """A result file's suffix naming its overrides: ``-max_num_batched_tokens512``."""
    return "".join(f"-{path.rsplit('.', 1)[-1]}{value}" for path, value in overrides.items())
