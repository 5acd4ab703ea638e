"""The router on the real local cluster: OpenAI API, the algorithm against an independent loop, state in
Redis, resume after a router replica dies, errors."""

from __future__ import annotations

import contextlib
import json
import math
import time

import httpx
import psutil
import pytest
import ray
from ray import serve

from deployments.protocol import StepSampling

pytestmark = pytest.mark.cluster
SMALL = {"token_budget": 40, "step_max_tokens": 16, "final_max_tokens": 12, "temperature": 0}
QUESTION = "What is 12 times 3? Think step by step."


@pytest.fixture(scope="module")
def key(local_cluster):
    return local_cluster.new_tenant("api-tests")


@pytest.fixture(scope="module")
def client(local_cluster, key):
    with httpx.Client(base_url=local_cluster.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
        yield c


def chat(client, content=QUESTION, **fields):
    body = {"model": "glimprouter", "messages": [{"role": "user", "content": content}], **SMALL, **fields}
    return client.post("/v1/chat/completions", json=body)


# ---- the algorithm, against a loop written here from glimprouter-algorithm.md ----------------------------


def reference_loop(
    local_cluster, question: str, tau: float, budget: int, step_max: int, answer_max: int
) -> tuple[list[tuple[str, str]], str]:
    """Greedy GlimpRouter by the reference's rules (glimprouter-algorithm.md), with the pools' handles and the
    models' own tokenizers: ([(pool, step text)], final answer). Every step gets the full ``step_max``; thinking
    stops after ``</think>``, after two identical last steps (more than two steps), or after the step whose
    tokens reach ``budget`` (kept whole); an EOS step does not stop it."""
    from transformers import AutoTokenizer

    from cluster.ops.models import ensure_embedded_model

    cfg = local_cluster.config
    toks = {
        r: AutoTokenizer.from_pretrained(str(ensure_embedded_model(p.model.embedded))) for r, p in cfg.pools.items()
    }
    handles = {
        r: serve.get_deployment_handle(n, app_name=cfg.name)
        for r, n in (("small", "SmallPool"), ("large", "LargePool"))
    }
    messages = [{"role": "user", "content": question}]

    def render(role, turn=None):
        if turn is None:
            return list(
                toks[role].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
            )
        chat = [*messages, {"role": "assistant", "content": turn}]
        return list(toks[role].apply_chat_template(chat, continue_final_message=True, tokenize=True)["input_ids"])

    def prompt(role, steps):
        return render(role, "<think>" + "\n\n".join(steps) + "\n\n" if steps else None)

    async def generate(role, prompt_ids, sampling):
        call = handles[role].options(method_name="step", stream=True).remote(prompt_ids, sampling)
        return [c async for c in call][-1]

    async def run():
        steps, out, used = [], [], 0
        while True:
            glimpse = await handles["small"].glimpse.remote(prompt("small", steps), 20)
            probs = [math.exp(lp) for lp in glimpse.top_logprobs]
            entropy = -sum(p / sum(probs) * math.log(p / sum(probs)) for p in probs)
            role = "large" if entropy >= tau else "small"
            last = await generate(
                role, prompt(role, steps), StepSampling(max_tokens=step_max, temperature=0.0, stop=["\n\n"])
            )
            steps.append(last.text)
            out.append((role, last.text))
            used += last.output_tokens
            if "</think>" in last.text or (len(steps) > 2 and steps[-1] == steps[-2]) or used >= budget:
                thinking = "\n\n".join(steps).split("</think>", 1)[0]
                final = await generate(
                    "large",
                    render("large", "<think>" + thinking + "\n</think>\n\n"),
                    StepSampling(max_tokens=answer_max, temperature=0.0),
                )
                return out, final.text

    import asyncio

    return asyncio.run(run())


@pytest.mark.parametrize(
    "question, tau, budget",
    [
        (QUESTION, 1.0, 40),
        ("Name a prime number larger than 10.", 1.0, 40),
        ("Why is the sky blue?", 0.5, 40),
        (QUESTION, 0.5, 21),
        ("Why is the sky blue?", 1.0, 27),  # budgets that end mid-step
    ],
)
def test_steps_decisions_and_answer_equal_the_reference_loop(local_cluster, client, question, tau, budget):
    response = chat(client, question, tau=tau, token_budget=budget)
    assert response.status_code == 200, response.text
    routed = [s["pool"] for s in response.json()["routing"]["steps"]]
    trace = client.get(f"/v1/requests/{response.json()['id']}").json()
    expected, answer = reference_loop(
        local_cluster, question, tau, budget, SMALL["step_max_tokens"], SMALL["final_max_tokens"]
    )
    assert [(s["pool"], s["text"]) for s in trace["steps"]] == expected
    assert routed == [pool for pool, _ in expected]
    assert trace["final"]["text"] == answer == response.json()["choices"][0]["message"]["content"]
    assert all(
        s["finish_reason"] != "length" or s["output_tokens"] == SMALL["step_max_tokens"] for s in trace["steps"]
    )  # no step was cut short of its full maximum


@pytest.mark.parametrize("question", ["Why is the sky blue?", "Explain how to compute 17*23 step by step."])
def test_fused_glimpse_routes_as_the_separate_glimpse(client, question):
    """``fused_glimpse`` takes the glimpse of step k+1 in step k's small-pool call, on the prompt the router
    renders for step k+1: greedy, the same steps get the same entropies as with separate glimpses. Never for
    step 1 (step 0's prompt is not a prefix of step 1's), nor after the step that spends the budget."""
    budget, step_max = 64, SMALL["step_max_tokens"]

    def steps(fused):
        response = chat(client, question, tau=10.0, fused_glimpse=fused, token_budget=budget)  # tau 10: all small
        assert response.status_code == 200, response.text
        return client.get(f"/v1/requests/{response.json()['id']}").json()["steps"]

    separate, fused = steps(False), steps(True)
    assert [s["text"] for s in fused] == [s["text"] for s in separate]
    assert len(fused) >= 3, "the question should take at least three steps"
    spent = [sum(s["output_tokens"] for s in fused[:k]) for k in range(len(fused))]
    asked = [k >= 1 and spent[k] + min(step_max, budget - spent[k]) < budget for k in range(len(fused))]
    assert [s["glimpse_fused"] for s in fused] == [False, *asked[:-1]]
    assert not any(s["glimpse_fused"] for s in separate)
    for ref, got in zip(separate, fused, strict=False):
        assert got["entropy"] == pytest.approx(ref["entropy"], abs=1e-3)


@pytest.mark.parametrize("question", ["Why is the sky blue?", "Explain how to compute 17*23 step by step."])
def test_glimpse_in_step_routes_as_the_separate_glimpse(client, question):
    """``glimpse_in_step`` reads each glimpse from the first token of a small step call (cancelled when the step
    goes large): greedy, the same steps go to the same pools with the same entropies as with separate
    glimpses."""

    def run(in_step):
        response = chat(client, question, tau=1.0, glimpse_in_step=in_step, token_budget=64)
        assert response.status_code == 200, response.text
        return client.get(f"/v1/requests/{response.json()['id']}").json()["steps"]

    separate, in_step = run(False), run(True)
    assert [(s["pool"], s["text"]) for s in in_step] == [(s["pool"], s["text"]) for s in separate]
    assert len(in_step) >= 3 and {s["pool"] for s in in_step} == {"small", "large"}, "want steps in both pools"
    for ref, got in zip(separate, in_step, strict=False):
        assert got["entropy"] == pytest.approx(ref["entropy"], abs=1e-3)


def test_fused_and_in_step_glimpses_conflict(client):
    response = chat(client, fused_glimpse=True, glimpse_in_step=True)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "glimpse_in_step"


# ---- the OpenAI API -------------------------------------------------------------------------------------


def test_openai_client_non_streaming(local_cluster, key):
    import openai

    oai = openai.OpenAI(base_url=f"{local_cluster.base_url}/v1", api_key=key)
    assert [m.id for m in oai.models.list().data] == ["glimprouter"]
    result = oai.chat.completions.create(
        model="glimprouter",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=64,
        extra_body={"token_budget": 40, "step_max_tokens": 16},
    )
    extra = result.model_extra
    assert result.choices[0].message.model_extra["reasoning_content"]
    assert extra["routing"]["steps"] and {s["pool"] for s in extra["routing"]["steps"]} <= {"small", "large"}
    per_pool = result.usage.model_extra["per_pool"]
    assert (
        result.usage.completion_tokens
        == per_pool["small"]["completion_tokens"] + per_pool["large"]["completion_tokens"]
    )


def test_openai_client_streaming_matches_stored_state(local_cluster, key):
    import openai

    oai = openai.OpenAI(base_url=f"{local_cluster.base_url}/v1", api_key=key)
    stream = oai.chat.completions.create(
        model="glimprouter",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        temperature=0,
        max_tokens=64,
        stream_options={"include_usage": True},
        extra_body={"token_budget": 40, "step_max_tokens": 16},
    )
    reasoning, content, usage, routing, rid = [], [], None, None, None
    for chunk in stream:
        rid = chunk.id
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
        routing = (chunk.model_extra or {}).get("routing") or routing
    trace = httpx.get(f"{local_cluster.base_url}/v1/requests/{rid}", headers={"Authorization": f"Bearer {key}"}).json()
    assert trace["status"] == "finished"
    assert "".join(reasoning) == "\n\n".join(s["text"] for s in trace["steps"])
    assert "".join(content) == trace["final"]["text"]
    assert [s["pool"] for s in routing["steps"]] == [s["pool"] for s in trace["steps"]]
    assert usage.completion_tokens == sum(s["output_tokens"] for s in trace["steps"]) + trace["final"]["output_tokens"]


def test_completions_endpoint(client):
    body = {"model": "glimprouter", "prompt": QUESTION, **SMALL}
    result = client.post("/v1/completions", json=body).json()
    assert result["object"] == "text_completion" and isinstance(result["choices"][0]["text"], str)


@pytest.mark.parametrize("policy,pool", [("large_only", "large"), ("small_only", "small")])
def test_baselines_route_as_named(client, policy, pool):
    result = chat(client, policy=policy).json()
    assert {s["pool"] for s in result["routing"]["steps"]} == {pool}
    assert result["usage"]["per_pool"]["small"]["glimpses"] == 0
    other = "small" if pool == "large" else "large"
    assert result["usage"]["per_pool"][other]["completion_tokens"] == 0


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus"),
        ({"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "tau": -1}, 400, "tau"),
        (
            {"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
            400,
            "temperature",
        ),
        ({"model": "glimprouter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "glimprouter", "messages": []}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "glimprouter", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
    ],
)
def test_bad_input_gets_openai_error(client, body, status, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_and_huge_body(client, local_cluster):
    bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    huge = client.post("/v1/chat/completions", content=b" " * (local_cluster.config.router.max_body_bytes + 1))
    assert huge.status_code == 413 and "error" in huge.json()


def test_missing_or_wrong_key_is_401(local_cluster):
    for headers in ({}, {"Authorization": "Bearer gr-00000000-nottherightkeyatallxx"}):
        response = httpx.get(f"{local_cluster.base_url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_another_tenants_request_is_404(local_cluster, client):
    rid = chat(client).json()["id"]
    other = local_cluster.new_tenant("api-tests-other")
    response = httpx.get(f"{local_cluster.base_url}/v1/requests/{rid}", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404
    assert client.get(f"/v1/requests/{rid}").status_code == 200
    listed = httpx.get(f"{local_cluster.base_url}/v1/requests", headers={"Authorization": f"Bearer {other}"}).json()
    assert rid not in listed["data"] and rid in client.get("/v1/requests").json()["data"]


# ---- failures in the middle of a request ----------------------------------------------------------------


def _stream_until(local_cluster, key, n_steps: int, then=lambda rid: None, **fields) -> str:
    """Start a streamed request, call ``then(id)`` once ``n_steps`` steps are stored, then hang up."""
    body = {
        "model": "glimprouter",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        **SMALL,
        "token_budget": 120,
        **fields,
    }
    with httpx.stream(
        "POST",
        f"{local_cluster.base_url}/v1/chat/completions",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                rid = json.loads(line[6:])["id"]
                trace = httpx.get(
                    f"{local_cluster.base_url}/v1/requests/{rid}", headers={"Authorization": f"Bearer {key}"}
                ).json()
                if len(trace["steps"]) >= n_steps:
                    then(rid)
                    return rid
    raise AssertionError("stream ended early")


def _trace(local_cluster, key, rid):
    """The request's trace, waiting for a router replica to answer (one may be restarting)."""
    deadline = time.time() + 120
    while True:
        try:
            response = httpx.get(
                f"{local_cluster.base_url}/v1/requests/{rid}", timeout=30, headers={"Authorization": f"Bearer {key}"}
            )
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "no router replica answered"
        time.sleep(1)


def test_client_disconnect_cancels_the_request(local_cluster, key):
    rid = _stream_until(local_cluster, key, 1)
    deadline = time.time() + 30
    while _trace(local_cluster, key, rid)["status"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    trace = _trace(local_cluster, key, rid)
    assert trace["status"] == "cancelled"
    assert [s["index"] for s in trace["steps"]] == list(range(len(trace["steps"])))


def test_router_replica_killed_mid_request_resumes_from_last_step(local_cluster, key):
    def kill_router(_):
        details = serve.context._get_global_client().get_serve_details()
        router = details["applications"][local_cluster.config.name]["deployments"]["Router"]["replicas"][0]
        ray.kill(ray.get_actor(router["actor_name"], namespace="serve"), no_restart=True)
        with contextlib.suppress(psutil.NoSuchProcess):  # dead before the client hangs up, else the hang-up
            psutil.Process(router["pid"]).wait(timeout=30)  # cancels the request first

    rid = _stream_until(local_cluster, key, 2, then=kill_router, step_max_tokens=8)
    before = _trace(local_cluster, key, rid)
    assert before["status"] == "running"
    kept = before["steps"]
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.time() + 120
    while True:  # Serve replaces the replica; the lease of the dead one expires after lease_s
        try:
            response = httpx.post(f"{local_cluster.base_url}/v1/requests/{rid}/resume", headers=headers, timeout=300)
            if response.status_code == 200:
                break
            assert response.status_code in (409, 503), response.text
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "resume never succeeded"
        time.sleep(1)
    after = _trace(local_cluster, key, rid)
    assert after["status"] == "finished"
    assert after["steps"][: len(kept)] == kept
    assert [s["index"] for s in after["steps"]] == list(range(len(after["steps"])))
    assert response.json()["choices"][0]["message"]["content"] == after["final"]["text"]


# ---- tenancy through the API ----------------------------------------------------------------------------


def test_usage_sums_equal_the_tokens_in_responses(local_cluster):
    import asyncio

    import redis.asyncio as aioredis

    from router_service.tenancy import TenantStore

    key = local_cluster.new_tenant("usage-check")
    with httpx.Client(base_url=local_cluster.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
        results = [chat(c).json(), chat(c, policy="large_only").json()]

    async def read():
        client = aioredis.Redis.from_url(local_cluster.redis_url())
        usage = await TenantStore(client).usage("usage-check")
        await client.aclose()
        return usage

    usage = asyncio.run(read())["pools"]
    for pool in ("small", "large"):
        reported = sum(r["usage"]["per_pool"][pool]["completion_tokens"] for r in results)
        assert int(usage[pool]["output_tokens"]) == reported
        assert int(usage[pool]["steps"]) == sum(r["usage"]["per_pool"][pool]["steps"] for r in results)
    assert int(usage["small"]["glimpses"]) == results[0]["usage"]["per_pool"]["small"]["glimpses"]
    assert int(usage["small"]["requests"]) + int(usage["large"]["requests"]) == 2
    admin = {"Authorization": f"Bearer {local_cluster.admin_key}"}
    served = httpx.get(f"{local_cluster.base_url}/v1/admin/tenants/usage-check/usage", headers=admin).json()
    assert served["pools"]["large"]["output_tokens"] == usage["large"]["output_tokens"]
    tenant_only = httpx.get(
        f"{local_cluster.base_url}/v1/admin/tenants/usage-check/usage", headers={"Authorization": f"Bearer {key}"}
    )
    assert tenant_only.status_code == 403 and tenant_only.json()["error"]["code"] == "admin_only"


def test_rate_limit_gives_429_with_openai_headers(local_cluster):
    from concurrent.futures import ThreadPoolExecutor

    from cluster.metrics import SPECS
    from cluster.ops import operators

    key = local_cluster.new_tenant("limited", requests_per_minute=1)
    endpoints, rejections = operators.metrics_endpoints(), SPECS["glimprouter_rejections"].exported
    before = operators.total(operators.scrape(endpoints), rejections, tenant="limited", reason="requests")
    headers = {"Authorization": f"Bearer {key}"}
    # Sent together, so that both fall in the same one-minute window.
    with (
        httpx.Client(base_url=local_cluster.base_url, headers=headers, timeout=300) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        responses = sorted(pool.map(lambda _: chat(c), range(2)), key=lambda r: r.status_code)
    admitted, refused = responses
    assert admitted.status_code == 200 and admitted.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1 and "x-ratelimit-reset-requests" in refused.headers
    deadline = time.time() + 40  # the refusal is in the project's metrics (Ray exports every few seconds)
    while operators.total(operators.scrape(endpoints), rejections, tenant="limited", reason="requests") <= before:
        assert time.time() < deadline, "the 429 was not counted in glimprouter_rejections"
        time.sleep(2)
