"""The request service over fake pools and a real Redis: one request from admission to finish, and failures
that leave its stored state consistent (finished as failed, the steps before kept, the admission released)."""

from __future__ import annotations

import pytest
from fakes import ANSWER, FakePool, FakeRenderer, Out
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException

from cluster.config import PolicySettings, load_config
from router_service.api_models import ChatCompletionRequest
from router_service.errors import APIError
from router_service.loop import AnswerDone, StepDone
from router_service.service import Finished, RequestService
from router_service.tenancy import TenantSettings

pytestmark = pytest.mark.redis


class FailingPool(FakePool):
    """A pool whose step call number ``fail_at`` (0-based) raises ``error``, after its first chunk when
    ``after_first_chunk``."""

    def __init__(self, outputs, fail_at: int, error: Exception, after_first_chunk: bool = False):
        super().__init__(outputs)
        self.fail_at, self.error, self.after_first_chunk, self.step_calls = fail_at, error, after_first_chunk, 0

    async def step(self, prompt, sampling, stream, affinity_key, next_glimpse=None, glimpse_top_k=None):
        call, self.step_calls = self.step_calls, self.step_calls + 1
        if call == self.fail_at:
            if self.after_first_chunk:
                async for chunk in super().step(prompt, sampling, stream, affinity_key):
                    yield chunk
                    break
            raise self.error
        async for chunk in super().step(prompt, sampling, stream, affinity_key, next_glimpse, glimpse_top_k):
            yield chunk


@pytest.fixture
async def service(redis_client):
    def make(small, large) -> RequestService:
        renderers = {"small": FakeRenderer("small"), "large": FakeRenderer("large")}
        return RequestService(load_config("local"), redis_client, {"small": small, "large": large}, renderers, "r-1")

    return make


def body(stream: bool = False, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "glimprouter",
            "messages": [{"role": "user", "content": "What is 6*7?"}],
            "stream": stream,
            "token_budget": 100,
            **fields,
        }
    )


async def tenant_of(svc: RequestService, policy: str = "large_only"):
    tenant, _ = await svc.tenants.create_tenant("acme", TenantSettings(policy=PolicySettings(policy=policy)))
    return tenant


async def drain(svc: RequestService, run) -> list:
    return [event async for event in svc.events(run)]


async def test_a_request_from_admission_to_finish(service, redis_client):
    large = FakePool([Out("a"), Out("b </think>"), Out(ANSWER)])
    svc = service(FakePool(), large)
    tenant = await tenant_of(svc)
    run = await svc.start(tenant, body(), "chat")
    assert await redis_client.zcard("glimp:t:acme:inflight") == 1  # admitted
    events = await drain(svc, run)
    assert [type(e) for e in events] == [StepDone, StepDone, AnswerDone, Finished]
    finished = events[-1]
    assert [s.text for s in finished.steps] == ["a", "b </think>"] and finished.answer.text == ANSWER
    trace = await svc.trace(tenant, run.loop.request_id)
    assert trace["status"] == "finished" and trace["final"]["text"] == ANSWER
    assert [s["text"] for s in trace["steps"]] == ["a", "b </think>"]
    assert trace["request"]["policy"]["policy"] == "large_only"
    usage = await svc.tenants.usage("acme")
    assert usage["pools"]["large"]["output_tokens"] == finished.usage["per_pool"]["large"]["completion_tokens"] == 12
    assert usage["pools"]["large"]["requests"] == 1 and usage["pools"]["large"]["steps"] == 2
    assert await redis_client.zcard("glimp:t:acme:inflight") == 0  # released


@pytest.mark.parametrize("error", [RayServeException("no replica"), RayActorError()])
async def test_a_pool_error_that_survives_the_retry_is_a_503_and_fails_the_request(service, redis_client, error):
    large = FailingPool([Out("a"), Out("b"), Out(ANSWER)], fail_at=1, error=error)
    svc = service(FakePool(), large)
    tenant = await tenant_of(svc)
    run = await svc.start(tenant, body(), "chat")
    with pytest.raises(APIError) as info:
        await drain(svc, run)
    assert (info.value.status, info.value.code) == (503, "pool_unavailable")
    assert info.value.headers["Retry-After"]
    trace = await svc.trace(tenant, run.loop.request_id)
    assert trace["status"] == "failed" and "pool unavailable" in trace["error"]
    assert [s["index"] for s in trace["steps"]] == [0]  # the step before the failure is kept
    assert await redis_client.zcard("glimp:t:acme:inflight") == 0


async def test_a_step_that_fails_after_its_first_chunk_keeps_the_steps_before(service, redis_client):
    small = FailingPool(
        [Out("one"), Out("two"), Out("three")], fail_at=2, error=RayActorError(), after_first_chunk=True
    )
    svc = service(small, FakePool([Out(ANSWER)]))
    tenant = await tenant_of(svc, policy="small_only")
    run = await svc.start(tenant, body(stream=True), "chat")
    seen = []
    with pytest.raises(APIError) as info:
        async for event in svc.events(run):
            seen.append(event)
    assert info.value.status == 503
    assert [e.record.text for e in seen if isinstance(e, StepDone)] == ["one", "two"]
    trace = await svc.trace(tenant, run.loop.request_id)
    assert trace["status"] == "failed" and [s["text"] for s in trace["steps"]] == ["one", "two"]


async def test_an_unexpected_error_fails_the_request_and_propagates(service, redis_client):
    large = FailingPool([Out("a"), Out(ANSWER)], fail_at=0, error=ValueError("bug"))
    svc = service(FakePool(), large)
    tenant = await tenant_of(svc)
    run = await svc.start(tenant, body(), "chat")
    with pytest.raises(ValueError):
        await drain(svc, run)
    trace = await svc.trace(tenant, run.loop.request_id)
    assert trace["status"] == "failed" and trace["error"] == "internal error: ValueError"
    assert await redis_client.zcard("glimp:t:acme:inflight") == 0


async def test_resume_continues_from_the_stored_steps(service):
    first = service(FakePool(), FailingPool([Out("a"), Out("b"), Out(ANSWER)], fail_at=1, error=RuntimeError()))
    tenant = await tenant_of(first)
    run = await first.start(tenant, body(), "chat")
    steps = []
    with pytest.raises(RuntimeError):
        async for event in first.events(run):
            steps += [event] if isinstance(event, StepDone) else []
    # the owner died instead (its failure was never recorded): another replica takes the request over
    await first.store.redis.hset(
        f"glimp:t:acme:req:{run.loop.request_id}", mapping={"status": "running", "lease_until": 0}
    )
    second = service(FakePool(), FakePool([Out("b </think>"), Out(ANSWER)]))
    second.replica = "r-2"
    resumed = await second.resume(tenant, run.loop.request_id, stream=False)
    assert [s.text for s in resumed.done] == ["a"]
    events = await drain(second, resumed)
    assert [s.text for s in events[-1].steps] == ["a", "b </think>"]
    assert (await second.trace(tenant, run.loop.request_id))["status"] == "finished"


async def test_a_model_the_service_does_not_serve_is_a_404(service):
    svc = service(FakePool(), FakePool())
    with pytest.raises(APIError) as info:
        await svc.start(await tenant_of(svc), body(model="gpt-4"), "chat")
    assert (info.value.status, info.value.param) == (404, "model")


async def test_max_completion_tokens_bounds_steps_and_answer(service):
    large = FakePool([Out("a", None), Out("b", None), Out(ANSWER, None)])
    svc = service(FakePool(), large)
    tenant = await tenant_of(svc)
    run = await svc.start(tenant, body(max_completion_tokens=10, step_max_tokens=4, token_budget=None), "chat")
    # no token_budget: the steps may take the limit but what is kept for the answer (at most half: 5)
    assert (run.stored.steps.token_budget, run.stored.steps.completion_limit) == (5, 10)
    finished = (await drain(svc, run))[-1]
    assert finished.usage["completion_tokens"] <= 10
    assert [c.arg.max_tokens for c in large.of("step")] == [4, 4, 2]  # the answer gets what is left


async def test_a_token_budget_over_the_completion_limit_is_a_400(service):
    svc = service(FakePool(), FakePool())
    with pytest.raises(APIError) as info:
        await svc.start(await tenant_of(svc), body(max_completion_tokens=10, token_budget=20), "chat")
    assert (info.value.status, info.value.param) == (400, "token_budget")


async def test_the_requests_seed_seeds_the_policy_and_its_id_comes_from_the_http_request(service):
    svc = service(FakePool(), FakePool())
    run = await svc.start(await tenant_of(svc), body(seed=42, user="u-7"), "chat", base_id="client-id-1")
    assert run.stored.policy.seed == 42 and run.stored.user == "u-7"
    assert run.loop.request_id == "chatcmpl-client-id-1"
    assert (await svc.trace(run.tenant, "client-id-1"))["request_id"] == "chatcmpl-client-id-1"
    with pytest.raises(APIError) as info:  # the id names one request of the tenant
        await svc.start(run.tenant, body(), "chat", base_id="client-id-1")
    assert info.value.status == 409
