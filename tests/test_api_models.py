"""API request models: OpenAI fields, GlimpRouter's extension fields, and what is rejected."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router_service.api_models import ChatCompletionRequest, CompletionRequest

BASE = {"model": "glimprouter", "messages": [{"role": "user", "content": "What is 6*7?"}]}


def test_extension_fields_accepted():
    req = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "policy": "random",
            "tau": 0.9,
            "large_fraction": 0.3,
            "token_budget": 100,
            "step_max_tokens": 50,
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 5,
            "max_tokens": 64,
        }
    )
    assert (req.policy, req.tau, req.large_fraction, req.token_budget, req.step_max_tokens) == (
        "random",
        0.9,
        0.3,
        100,
        50,
    )
    assert req.stream_options.include_usage and req.completion_limit() == 64
    assert (
        ChatCompletionRequest.model_validate({**BASE, "max_tokens": 64, "max_completion_tokens": 32}).completion_limit()
        == 32
    )
    plain = ChatCompletionRequest.model_validate(BASE)
    assert (plain.policy, plain.tau, plain.n, plain.stream) == (None, None, 1, False)


def test_chat_messages():
    req = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "6*7?"}]},
            ],
        }
    )
    assert req.chat() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}]
    assert CompletionRequest(model="m", prompt="Hi").chat() == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"bogus": 1}, "bogus"),
        ({"tau": 10.5}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"large_fraction": 1.5}, "large_fraction"),
        ({"policy": "cheapest"}, "policy"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
        ({"messages": [{"role": "user", "content": "Hi", "extra": 1}]}, "messages.0.extra"),
        ({"stream_options": {"include_usage": True}}, ""),  # OpenAI: stream_options only with stream
    ],
)
def test_chat_request_rejected(patch, field):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({**BASE, **patch})
    assert [".".join(map(str, e["loc"])) for e in err.value.errors()] == [field]


@pytest.mark.parametrize(
    "body", [{"model": "m", "prompt": ""}, {"model": "m", "prompt": "x", "messages": []}, {"prompt": "x"}]
)
def test_completion_request_rejected(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)
