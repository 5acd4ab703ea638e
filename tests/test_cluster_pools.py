"""The model pools on the real local cluster: real vLLM CPU engines behind Ray Serve handles."""

from __future__ import annotations

import math
import time

import pytest
from ray import serve
from ray.serve.context import _get_global_client

from deployments.protocol import StepSampling

pytestmark = pytest.mark.cluster
PROMPT = "<|im_start|>user\nList three colours, one per paragraph.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def pools(local_cluster):
    name = local_cluster.config.name
    return {
        role: serve.get_deployment_handle(dep, app_name=name)
        for role, dep in (("small", "SmallPool"), ("large", "LargePool"))
    }


async def _step(handle, prompt, sampling, stream=False):
    return [c async for c in handle.options(method_name="step", stream=True).remote(prompt, sampling, stream)]


@pytest.mark.parametrize("role", ["small", "large"])
async def test_glimpse_returns_k_sorted_logprobs(pools, role):
    glimpse = await pools[role].glimpse.remote(PROMPT, 20)
    assert len(glimpse.top_logprobs) == 20
    assert glimpse.top_logprobs == sorted(glimpse.top_logprobs, reverse=True)
    assert sum(math.exp(lp) for lp in glimpse.top_logprobs) <= 1.0 + 1e-6
    assert glimpse.prompt_tokens > 0


@pytest.mark.parametrize("role", ["small", "large"])
async def test_greedy_steps_are_deterministic(pools, role):
    sampling = StepSampling(max_tokens=24, temperature=0.0, stop=["\n\n"])
    first = (await _step(pools[role], PROMPT, sampling))[-1]
    second = (await _step(pools[role], PROMPT, sampling))[-1]
    assert first.done and second.done
    assert first.text == second.text and first.output_token_ids == second.output_token_ids


async def test_step_stops_at_delimiter_and_reports_it(pools):
    prompt = "<|im_start|>user\nWrite two short paragraphs about the sea.<|im_end|>\n<|im_start|>assistant\n"
    last = (await _step(pools["small"], prompt, StepSampling(max_tokens=200, temperature=0.0, stop=["\n\n"])))[-1]
    assert last.finish_reason == "stop" and last.stopped_by == "\n\n"
    assert "\n\n" not in last.text and last.output_tokens > 0


async def test_streamed_step_deltas_add_up_to_the_final_text(pools):
    chunks = await _step(pools["large"], "The capital of France is", StepSampling(max_tokens=16, temperature=0.0), True)
    assert chunks[-1].done and len(chunks) > 2
    assert "".join(c.text for c in chunks[:-1]) == chunks[-1].text
    assert chunks[-1].output_tokens == len(chunks[-1].output_token_ids) == 16


async def test_token_id_prompts_are_accepted(pools):
    text = await pools["small"].glimpse.remote(PROMPT, 20)
    ids = await pools["small"].glimpse.remote([1, 9690, 198, 4093, 314], 20)
    assert ids.prompt_tokens == 5 and text.prompt_tokens > 5


def test_pools_are_distinct_deployments_with_their_own_autoscaling(local_cluster):
    def deployments():
        return _get_global_client().get_serve_details()["applications"][local_cluster.config.name]["deployments"]

    deadline = time.time() + 240  # a replica the autoscaler added under an earlier test's load may be starting
    while (
        any(r["state"] != "RUNNING" for name in ("SmallPool", "LargePool") for r in deployments()[name]["replicas"])
        and time.time() < deadline
    ):
        time.sleep(2)
    details = deployments()
    for role, name in (("small", "SmallPool"), ("large", "LargePool")):
        served = details[name]["deployment_config"]["autoscaling_config"]
        wanted = getattr(local_cluster.config.pools, role).autoscaling
        assert served["min_replicas"] == wanted.min_replicas and served["max_replicas"] == wanted.max_replicas
        assert served["target_ongoing_requests"] == wanted.target_ongoing_requests
        assert all(r["state"] == "RUNNING" for r in details[name]["replicas"])
    assert (
        details["SmallPool"]["deployment_config"]["autoscaling_config"]["max_replicas"]
        != details["LargePool"]["deployment_config"]["autoscaling_config"]["max_replicas"]
    )
