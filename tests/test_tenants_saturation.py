"""Tenants under saturation through the request service (fake pools, a real Redis): a large-step budget held over
100 steps and reported in usage; priority classes up to the tenant's ceiling; runs registered with the fair
dispatchers; overload refusals that take no admission."""

from __future__ import annotations

import math
import random

import pytest
from fakes import FakePool, FakeRenderer, Out

from cluster.config import PolicySettings, load_config
from router_service.api_models import ChatCompletionRequest
from router_service.budgets import Budget, LargeStepBudgets
from router_service.errors import APIError
from router_service.policy import first_token_entropy
from router_service.service import Finished, RequestService
from router_service.tenancy import TenantSettings

pytestmark = pytest.mark.redis
STEPS_PER_REQUEST, REQUESTS = 10, 10


def entropy_glimpses(n: int, seed: int = 7) -> list[list[float]]:
    """Top-20 log-probs whose entropies spread over (0, ln 20): one most likely token, 19 others ``gap`` below."""
    rng = random.Random(seed)
    return [[0.0] + [-rng.uniform(0.0, 8.0)] * 19 for _ in range(n)]


def make_service(redis_client, small, large, **router) -> RequestService:
    cfg = load_config("local")
    if router:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update=router)})
    renderers = {"small": FakeRenderer("small"), "large": FakeRenderer("large")}
    return RequestService(cfg, redis_client, {"small": small, "large": large}, renderers, "r-1")


def body(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "glimprouter",
            "messages": [{"role": "user", "content": "What is 6*7?"}],
            "token_budget": 4 * STEPS_PER_REQUEST,
            **fields,
        }
    )


async def run_one(svc: RequestService, tenant, **fields) -> Finished:
    run = await svc.start(tenant, body(**fields), "chat")
    events = [event async for event in svc.events(run)]
    return events[-1]


def pools_for(glimpses: list[list[float]]) -> tuple[FakePool, FakePool]:
    """A small pool answering the glimpses in order; both pools write distinct 4-token steps."""
    steps = [Out(f"step {i}") for i in range(len(glimpses) + 1)]
    return FakePool(steps, glimpses), FakePool(steps + [Out(f"answer {i}") for i in range(REQUESTS)])


async def test_a_large_step_budget_is_held_within_five_points_over_100_steps(redis_client):
    glimpses = entropy_glimpses(STEPS_PER_REQUEST * REQUESTS)
    entropies = [first_token_entropy(g) for g in glimpses]
    start_tau, budget = 1.0, 0.25
    assert sum(h >= start_tau for h in entropies) / len(entropies) > 0.5  # tau alone would send over half large
    svc = make_service(redis_client, *pools_for(glimpses))
    tenant, _ = await svc.tenants.create_tenant(
        "acme",
        TenantSettings(
            policy=PolicySettings(policy="glimprouter", tau=start_tau, max_large_fraction=budget),
            requests_per_minute=1000,
        ),
    )
    finished = [await run_one(svc, tenant) for _ in range(REQUESTS)]
    steps = [s for f in finished for s in f.steps]
    assert len(steps) == 100
    large = sum(s.pool == "large" for s in steps)
    assert abs(large / 100 - budget) <= 0.05, large
    usage = await svc.tenant_usage("acme", None)
    assert usage["max_large_fraction"] == budget
    assert usage["large_step_fraction"] == pytest.approx(large / 100)  # usage reports the share got
    assert svc.budgets.share("acme", budget) == pytest.approx(large / 100)


async def test_a_request_may_ask_for_its_own_budget(redis_client):
    glimpses = entropy_glimpses(STEPS_PER_REQUEST * REQUESTS, seed=11)
    svc = make_service(redis_client, *pools_for(glimpses))
    tenant, _ = await svc.tenants.create_tenant(
        "acme", TenantSettings(policy=PolicySettings(policy="glimprouter", tau=1.0), requests_per_minute=1000)
    )
    finished = [await run_one(svc, tenant, max_large_fraction=0.5) for _ in range(REQUESTS)]
    large = sum(s.pool == "large" for f in finished for s in f.steps)
    assert abs(large / 100 - 0.5) <= 0.05
    trace = await svc.trace(tenant, (await svc.request_ids(tenant, 10))[0][0])
    assert trace["request"]["policy"]["max_large_fraction"] == 0.5


def test_the_budget_quantile_follows_a_shifted_distribution():
    settings = load_config("local").router.large_step_budget
    budget = Budget(0.2, settings)
    rng = random.Random(3)
    for _ in range(300):  # entropies uniform on (0, 1): the 80th percentile is 0.8
        h = rng.random()
        budget.record(h, h >= budget.tau(0.5))
    assert 0.5 < budget.tau(0.5) < 1.0
    sent = []
    for _ in range(300):  # the tenant's traffic gets harder: uniform on (2, 3)
        h = 2 + rng.random()
        tau = budget.tau(0.5)
        sent.append(h >= tau)
        budget.record(h, h >= tau)
    assert sum(sent[-200:]) / 200 == pytest.approx(0.2, abs=0.05)
    assert 2.0 < budget.tau(0.5) < 3.0
    budget.shortfall = 0.0  # no debt to make up: the tau is the window's 80th percentile
    assert budget.tau(0.5) == pytest.approx(2.8, abs=0.05)


def test_a_request_without_a_budget_keeps_its_tau():
    budgets = LargeStepBudgets(load_config("local").router.large_step_budget)
    policy = PolicySettings(policy="glimprouter", tau=1.2)
    assert budgets.steer("acme", "r1", policy) is policy
    assert (
        budgets.steer("acme", "r1", policy.model_copy(update={"policy": "random", "max_large_fraction": 0.3})).tau
        == 1.2
    )
    budgets.observe("r1", 2.0)
    assert budgets.budgets == {}


async def test_a_request_may_ask_for_a_class_up_to_its_tenants_ceiling(redis_client):
    svc = make_service(redis_client, FakePool(), FakePool([Out("a </think>"), Out("answer")] * 2))
    tenant, _ = await svc.tenants.create_tenant(
        "acme", TenantSettings(policy=PolicySettings(policy="large_only"), priority="standard")
    )
    with pytest.raises(APIError) as info:
        await svc.start(tenant, body(priority="interactive"), "chat")
    assert (info.value.status, info.value.param) == (400, "priority")
    assert await redis_client.zcard("glimp:t:acme:inflight") == 0
    run = await svc.start(tenant, body(priority="batch"), "chat")
    assert run.loop.priority == "batch" and run.stored.priority == "batch"
    assert svc.fairness.registry.of(run.loop.request_id).priority == "batch"
    [event async for event in svc.events(run)]
    assert svc.fairness.registry.active_tenants() == set()  # unregistered at its end
    run = await svc.start(tenant, body(), "chat")
    assert run.loop.priority == "standard"  # the tenant's own class by default
    [event async for event in svc.events(run)]


async def test_with_fair_queueing_on_the_pools_see_each_calls_tenant(redis_client):
    from cluster.config import FairnessSettings

    glimpses = entropy_glimpses(STEPS_PER_REQUEST)
    svc = make_service(redis_client, *pools_for(glimpses), fairness=FairnessSettings(enabled=True))
    tenant, _ = await svc.tenants.create_tenant(
        "acme", TenantSettings(policy=PolicySettings(policy="glimprouter", tau=1.0), weight=2.0)
    )
    finished = await run_one(svc, tenant)
    small, large = svc.fairness.dispatchers["small"], svc.fairness.dispatchers["large"]
    large_tokens = sum(s.output_tokens for s in finished.steps if s.pool == "large") + finished.answer.output_tokens
    # glimpses cost 1 token (their prompt is cached in the fake); steps their output and half the uncached prompt
    assert large.served["acme"] == pytest.approx(
        large_tokens + 0.5 * 7 * (1 + sum(s.pool == "large" for s in finished.steps))
    )
    assert small.served["acme"] > 0 and set(small.served) == {"acme"}
    assert large.counters["acme"] == pytest.approx(large.served["acme"] / 2.0)  # weight 2
    assert small.running == large.running == 0


async def test_an_overloaded_router_refuses_the_lowest_class_first_without_taking_an_admission(redis_client):
    from cluster.config import FairnessSettings

    svc = make_service(
        redis_client,
        FakePool(),
        FakePool([Out("a </think>"), Out("answer")]),
        fairness=FairnessSettings(enabled=True, max_queue_depth=10),
    )
    tenant, _ = await svc.tenants.create_tenant(
        "acme", TenantSettings(policy=PolicySettings(policy="large_only"), priority="interactive")
    )
    svc.fairness.queued = lambda: 6  # as if six calls were waiting: past batch (5), below standard (7.5)
    with pytest.raises(APIError) as info:
        await svc.start(tenant, body(priority="batch"), "chat")
    assert info.value.status == 503 and math.isfinite(int(info.value.headers["Retry-After"]))
    assert await redis_client.zcard("glimp:t:acme:inflight") == 0 and (await svc.request_ids(tenant, 10))[0] == []
    run = await svc.start(tenant, body(priority="standard"), "chat")
    [event async for event in svc.events(run)]
    assert (await svc.trace(tenant, run.loop.request_id))["status"] == "finished"


def test_cli_sets_weight_class_and_budget(redis_url, capsys):
    import json

    import redis

    from cluster.ops import tenants_cli

    redis.Redis.from_url(redis_url).flushdb()

    def cli(*argv: str) -> tuple[int, str]:
        code = tenants_cli.main(["tenants", *argv, "--redis-url", redis_url])
        return code, capsys.readouterr().out

    code, _ = cli("create", "acme", "--weight", "3", "--priority", "batch", "--max-large-fraction", "0.25")
    assert code == 0
    settings = json.loads(cli("show", "acme", "--json")[1])["settings"]
    assert (settings["weight"], settings["priority"], settings["policy"]["max_large_fraction"]) == (3.0, "batch", 0.25)
    assert cli("set", "acme", "--priority", "interactive")[0] == 0
    code, out = cli("list")
    assert code == 0 and "interactive" in out and "3.0" in out
    code, out = cli("usage", "acme")
    assert code == 0 and "budget max_large_fraction 0.250" in out
    with pytest.raises(SystemExit):
        cli("set", "acme", "--priority", "urgent")
