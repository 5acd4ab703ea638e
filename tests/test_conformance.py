"""OpenAI conformance on the real local cluster, through the official ``openai`` SDK: each field as
docs/api.md says (honoured, extended, or refused with the error class the SDK raises), streaming and not."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

pytestmark = pytest.mark.cluster
MODEL = "glimprouter"
FAST = {"token_budget": 24, "step_max_tokens": 8, "final_max_tokens": 8}
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def key(local_cluster):
    return local_cluster.new_tenant("conformance", max_token_budget=512)


@pytest.fixture(scope="module")
def client(local_cluster, key):
    return openai.OpenAI(base_url=f"{local_cluster.base_url}/v1", api_key=key, max_retries=0, timeout=300)


def create(client, stream=False, extra=None, **fields):
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, stream=stream, extra_body={**FAST, **(extra or {})}, **fields
    )


def collect(stream) -> dict:
    """A streamed response's id, text, reasoning, finish reason, usage and routing."""
    out = {"content": "", "reasoning": "", "usage": None, "routing": None, "finish": None, "id": None}
    for chunk in stream:
        out["id"] = chunk.id
        extra = chunk.model_extra or {}
        out["routing"] = extra.get("routing") or out["routing"]
        out["usage"] = chunk.usage or out["usage"]
        for choice in chunk.choices:
            out["content"] += choice.delta.content or ""
            out["reasoning"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def trace(local_cluster, key, rid) -> dict:
    response = httpx.get(
        f"{local_cluster.base_url}/v1/requests/{rid}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("limit", [8, 20])
def test_max_completion_tokens_bounds_reasoning_and_answer_together(client, limit):
    result = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=limit, extra_body={"step_max_tokens": 8}
    )
    usage = result.usage
    assert usage.completion_tokens <= limit
    assert usage.completion_tokens == sum(p["completion_tokens"] for p in usage.model_extra["per_pool"].values())
    assert usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens


def test_max_completion_tokens_streamed(client):
    out = collect(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=8,
            extra_body={"step_max_tokens": 8},
        )
    )
    assert out["usage"].completion_tokens <= 8 and out["finish"] in ("stop", "length")


def test_max_tokens_is_the_same_bound(client):
    result = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8, extra_body={"step_max_tokens": 8}
    )
    assert result.usage.completion_tokens <= 8


def test_user_is_kept_in_the_trace(local_cluster, key, client):
    result = create(client, user="end-user-7")
    assert trace(local_cluster, key, result.id)["request"]["user"] == "end-user-7"


def test_models_retrieve_and_list(client):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object) == (MODEL, "model") and model.created > 0
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("stream", [False, True])
def test_one_x_request_id_the_clients_and_it_names_the_request(local_cluster, key, client, stream):
    sent = f"conf-{uuid.uuid4().hex[:12]}"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        stream=stream,
        extra_body=FAST,
        extra_headers={"x-request-id": sent},
    )
    assert raw.headers.get_list("x-request-id") == [sent]
    body = collect(raw.parse()) if stream else raw.parse().model_dump()
    assert body["id"] == f"chatcmpl-{sent}"
    assert trace(local_cluster, key, sent)["request_id"] == body["id"]  # the header's value, as it comes
    with pytest.raises(openai.ConflictError):  # the id names one request
        create(client, extra_headers={"x-request-id": sent})


def test_without_a_client_id_there_is_still_exactly_one(local_cluster, key, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, extra_body=FAST
    )
    (header,) = raw.headers.get_list("x-request-id")
    assert raw.parse().id == f"chatcmpl-{header}"
    assert trace(local_cluster, key, header)["status"] == "finished"


@pytest.mark.parametrize(
    "fields, extra, param",
    [
        ({"temperature": 5}, {}, "temperature"),
        ({}, {"tau": -1}, "tau"),
        ({}, {"bogus_field": 1}, "bogus_field"),
        ({"n": 2}, {}, "n"),
        ({}, {"token_budget": 100_000}, "token_budget"),  # over the key's limit of 512
        ({"max_completion_tokens": 10}, {"token_budget": 20}, "token_budget"),  # more than the completion bound
    ],
)
def test_invalid_parameters_are_bad_request_errors(client, fields, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={**FAST, **extra}, **{"temperature": 0, **fields}
        )
    assert info.value.status_code == 400 and info.value.body["param"] == param


def test_stream_options_without_stream_is_refused(client):
    with pytest.raises(openai.BadRequestError):
        create(client, stream_options={"include_usage": True})


def test_bad_key_is_an_authentication_error(local_cluster):
    bad = openai.OpenAI(base_url=f"{local_cluster.base_url}/v1", api_key="gr-00000000-" + "x" * 40, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_routing_shows_what_its_policy_reads(client):
    drawn = create(client, seed=42, extra={"policy": "random", "large_fraction": 0.5})
    routing = drawn.model_extra["routing"]
    assert (routing["policy"], routing["seed"], routing["large_fraction"]) == ("random", 42, 0.5)
    glimpsed = create(client, seed=42, extra={"policy": "glimprouter", "tau": 1.0}).model_extra["routing"]
    assert glimpsed["tau"] == 1.0 and "large_fraction" not in glimpsed and "seed" not in glimpsed


def test_request_lists_are_newest_first_with_a_limit(local_cluster, key, client):
    ids = [create(client).id for _ in range(3)]
    headers = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{local_cluster.base_url}/v1/requests", params={"limit": 2}, headers=headers, timeout=30).json()
    assert listed["data"] == ids[::-1][:2] and listed["has_more"] is True
    admin = httpx.get(
        f"{local_cluster.base_url}/v1/requests",
        params={"limit": 100},
        timeout=30,
        headers={"Authorization": f"Bearer {local_cluster.admin_key}"},
    ).json()
    assert f"conformance/{ids[-1]}" in admin["data"]
    assert trace(local_cluster, local_cluster.admin_key, ids[-1])["tenant"] == "conformance"
    bad = httpx.get(f"{local_cluster.base_url}/v1/requests", params={"limit": 0}, headers=headers, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_glimpses_prefill(client, stream):
    fields = {"stream_options": {"include_usage": True}} if stream else {}
    result = create(client, stream=stream, extra={"policy": "glimprouter", "tau": 1.0}, **fields)
    usage = collect(result)["usage"] if stream else result.usage
    small = usage.model_extra["per_pool"]["small"]
    assert small["glimpses"] > 0 and small["glimpse_prompt_tokens"] > 0
    assert small["prompt_tokens"] >= small["glimpse_prompt_tokens"]
