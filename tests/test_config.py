"""Config tree: the shipped configs load, and every bad input is a ConfigError naming the field's dotted path."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import CONFIG_DIR, ClusterConfig, ConfigError, load_config, set_fields
from cluster.pool_config import AutoscalingSettings, Placement


def test_shipped_configs_load():
    local = load_config("local")  # a bare name means a shipped config
    assert local.pools.small.model.name == "smollm2-135m-instruct"
    assert local.pools.large.model.name == "gemma3-270m"
    assert local.redis.url == "redis://127.0.0.1:6390/0"
    assert (local.router.steps.step_max_tokens, local.router.steps.token_budget) == (48, 160)
    assert local.router.steps.delimiter == "\n\n" and local.router.steps.top_k == 20

    gpu = load_config(CONFIG_DIR / "gpu-example.yaml")
    assert gpu.pools.large.model.name == "DeepSeek-R1-Distill-Qwen-32B"
    assert gpu.pools.large.engine.tensor_parallel_size == 2
    assert gpu.router.policy.tau == 0.9
    assert gpu.pools.large.placement.ray_actor_options() == {
        "num_cpus": 8.0,
        "num_gpus": 2.0,
        "resources": {"large_pool": 0.001},
        "accelerator_type": "H100",
    }


def _with(changes: dict) -> dict:
    """local.yaml with ``{dotted.path: value}`` set."""
    return set_fields(yaml.safe_load((CONFIG_DIR / "local.yaml").read_text()), changes)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"bogus": 1}, "\nbogus: "),
        ({"pools.small.bogus": 1}, "\npools.small.bogus: "),
        ({"pools.large.engine.bogus": 1}, "\npools.large.engine.bogus: "),
        ({"router.steps.bogus": 1}, "\nrouter.steps.bogus: "),
        ({"pools.small.autoscaling.min_replicas": 3}, "\npools.small.autoscaling: "),  # max_replicas is 2
        ({"pools.small.autoscaling.initial_replicas": 3}, "\npools.small.autoscaling: "),
        ({"pools.large.engine.max_logprobs": 19}, "\npools.large.engine.max_logprobs: "),
        ({"router.policy.tau": -0.1}, "\nrouter.policy.tau: "),
        ({"redis.url": "http://127.0.0.1:6379/0"}, "\nredis.url: "),
        ({"pools.small.engine.tensor_parallel_size": 2, "pools.small.placement.num_gpus": 1}, "\npools.small: "),
        ({"pools.small.model.path": "/models/x"}, "\npools.small.model: "),  # embedded is set too
        ({"router.steps.step_max_tokens": 2048}, "router.steps.step_max_tokens must be below"),  # max_model_len 2048
    ],
)
def test_invalid_config_names_field(tmp_path, changes, named):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(changes)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid config\n")
    assert named in message
    assert message.count("\n") == 1, message  # exactly one problem reported


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: p.write_text("pools: [unclosed\n"), "not valid YAML"),
        (lambda p: p.write_text("- a\n- b\n"), "<root>: "),
        (lambda p: None, "config file not found"),
        pytest.param(lambda p: p.mkdir(), "cannot read config", id="directory"),
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe name: x"), "cannot read config", id="not-utf8"),
    ],
)
def test_unreadable_config(tmp_path, write, expected):
    path = tmp_path / "bad.yaml"
    write(path)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_autoscaling_to_serve():
    scaling = AutoscalingSettings(
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=16,
        max_ongoing_requests=32,
        upscale_delay_s=5,
        downscale_delay_s=60,
    )
    assert scaling.to_serve() == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 60.0,
    }
    assert AutoscalingSettings(min_replicas=0, max_replicas=4, initial_replicas=2).to_serve()["initial_replicas"] == 2


def test_placement_ray_actor_options():
    assert Placement().ray_actor_options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert Placement(node_resource="small_pool", num_cpus=2, num_gpus=0.5).ray_actor_options() == {
        "num_cpus": 2.0,
        "num_gpus": 0.5,
        "resources": {"small_pool": 0.001},
    }


def test_engine_priority_needs_both_engines_scheduling_by_priority():
    cfg = load_config("local").model_dump()
    cfg["router"]["fairness"] = {"enabled": True, "engine_priority": True}
    with pytest.raises(ValidationError, match="scheduling_policy: priority"):
        ClusterConfig.model_validate(cfg)
    cfg["pools"]["small"]["engine"]["scheduling_policy"] = "priority"
    with pytest.raises(ValidationError, match=r"\['large'\] not"):
        ClusterConfig.model_validate(cfg)
    cfg["pools"]["large"]["engine"]["scheduling_policy"] = "priority"
    assert ClusterConfig.model_validate(cfg).router.fairness.engine_priority


def test_engine_args_pass_optional_engine_settings_only_where_set():
    from deployments.pool import engine_args

    bench = load_config("gpu-bench").pools.large
    args = engine_args(bench)
    assert args["model"].endswith("qwen2.5-14b") and args["load_format"] == "dummy"
    assert args["kv_cache_memory_bytes"] == 24 * 2**30  # a GPU pool: the KV cache by size
    defaults = {
        "max_num_batched_tokens",
        "max_cudagraph_capture_size",
        "compilation_config",
        "disable_custom_all_reduce",
    }
    assert not defaults & set(args)  # vLLM's defaults
    assert args["scheduling_policy"] == "fcfs"
    tuned = bench.model_copy(
        update={
            "engine": bench.engine.model_copy(
                update={
                    "max_num_batched_tokens": 512,
                    "max_cudagraph_capture_size": 1024,
                    "cudagraph_mode": "FULL",
                    "disable_custom_all_reduce": True,
                }
            )
        }
    )
    tuned_args = engine_args(tuned)
    assert (tuned_args["max_num_batched_tokens"], tuned_args["max_cudagraph_capture_size"]) == (512, 1024)
    assert tuned_args["disable_custom_all_reduce"] is True
    assert tuned_args["compilation_config"] == {"cudagraph_mode": "FULL"}
    on_cpu = bench.model_copy(update={"placement": bench.placement.model_copy(update={"num_gpus": 0})})
    assert "kv_cache_memory_bytes" not in engine_args(on_cpu)  # CPU: VLLM_CPU_KVCACHE_SPACE instead
