"""OpenAI response shapes: usage sums and per-pool split, the routing object, SSE chunks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster.config import PolicySettings
from router_service.loop import AnswerDone
from router_service.responses import (
    ChunkWriter,
    chat_completion,
    reasoning_text,
    routing_summary,
    text_completion,
    usage,
)
from router_service.state import StepRecord

STEPS = [
    StepRecord(0, "small", 0.2, "a", 10, 100, 0, 1.0, 10.0, "stop"),
    StepRecord(1, "large", 2.5, "b", 20, 110, 90, 1.1, 30.0, "stop"),
    StepRecord(2, "small", 0.4, "c", 5, 130, 120, 1.2, 5.0, "stop"),
]
ANSWER = AnswerDone("large", "42", prompt_tokens=150, cached_tokens=140, output_tokens=7, finish_reason=None, ms=9.0)


def test_usage_sums_and_per_pool():
    """Each pool's prompt and cached tokens include the final answer's, so its hit rate counts every call."""
    assert usage(STEPS, ANSWER, prompt_tokens=30, glimpses=3) == {
        "prompt_tokens": 30,
        "completion_tokens": 42,  # 10 + 20 + 5 steps + 7 answer
        "total_tokens": 72,
        "completion_tokens_details": {"reasoning_tokens": 35},
        "per_pool": {
            "small": {
                "steps": 2,
                "completion_tokens": 15,
                "prompt_tokens": 230,
                "cached_prompt_tokens": 120,
                "glimpses": 3,
                "glimpse_prompt_tokens": 0,
            },
            "large": {"steps": 1, "completion_tokens": 27, "prompt_tokens": 260, "cached_prompt_tokens": 230},
        },
    }


def test_glimpse_prefill_counts_in_the_small_pools_prompt_tokens():
    glimpsed = [dataclasses.replace(s, glimpse_prompt_tokens=40, glimpse_cached_tokens=30) for s in STEPS]
    small = usage(glimpsed, ANSWER, prompt_tokens=30, glimpses=3)["per_pool"]["small"]
    assert (small["glimpse_prompt_tokens"], small["prompt_tokens"], small["cached_prompt_tokens"]) == (120, 350, 210)


def test_routing_summary():
    summary = routing_summary(PolicySettings(policy="glimprouter", tau=1.0, seed=7), STEPS)
    assert summary["policy"] == "glimprouter" and summary["tau"] == 1.0
    assert "seed" not in summary and "large_fraction" not in summary  # glimprouter reads neither
    assert summary["large_step_fraction"] == 0.3333
    assert summary["steps"][1] == {
        "index": 1,
        "pool": "large",
        "entropy": 2.5,
        "tokens": 20,
        "glimpse_ms": 1.1,
        "glimpse_fused": False,
        "step_ms": 30.0,
    }
    assert routing_summary(PolicySettings(), [])["large_step_fraction"] == 0.0
    drawn = routing_summary(PolicySettings(policy="random", large_fraction=0.5, seed=42), [])
    assert (drawn["large_fraction"], drawn["seed"]) == (0.5, 42) and "tau" not in drawn


@pytest.mark.parametrize("build, obj", [(chat_completion, "chat.completion"), (text_completion, "text_completion")])
def test_whole_responses(build, obj):
    body = build("req-1", "glimprouter", reasoning_text(STEPS, "\n\n"), ANSWER, {"total_tokens": 72}, {"policy": "x"})
    choice = body["choices"][0]
    assert (body["id"], body["object"], body["model"], choice["finish_reason"]) == ("req-1", obj, "glimprouter", "stop")
    part = choice.get("message", choice)  # chat: the message; text: the choice itself
    assert (part.get("content", part.get("text")), part["reasoning_content"]) == ("42", "a\n\nb\n\nc")


def parse(line: str) -> dict:
    assert line.startswith("data: ") and line.endswith("\n\n") and line.count("\n") == 2
    return json.loads(line[len("data: ") :])


def test_chat_chunks():
    writer = ChunkWriter("req-1", "glimprouter", chat=True)
    lines = [
        writer.delta(role="assistant"),
        writer.delta(reasoning="think"),
        writer.delta(content="42"),
        writer.finish("stop", {"policy": "glimprouter"}),
        writer.usage({"total_tokens": 72}),
    ]
    chunks = [parse(line) for line in lines]
    assert {(c["id"], c["object"], c["model"], c["created"]) for c in chunks} == {
        ("req-1", "chat.completion.chunk", "glimprouter", writer.created)
    }
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [
        {"role": "assistant"},
        {"reasoning_content": "think"},
        {"content": "42"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "stop"]
    assert chunks[3]["routing"] == {"policy": "glimprouter"}
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {"total_tokens": 72}
    assert ChunkWriter.done() == "data: [DONE]\n\n"
    assert parse(ChunkWriter.error({"error": {"message": "lost"}})) == {"error": {"message": "lost"}}


def test_text_chunks():
    writer = ChunkWriter("req-1", "glimprouter", chat=False)
    delta, finish = parse(writer.delta(content="42")), parse(writer.finish("length", {}))
    assert delta["object"] == finish["object"] == "text_completion"
    assert delta["choices"] == [{"index": 0, "text": "42", "reasoning_content": None, "finish_reason": None}]
    assert finish["choices"] == [{"index": 0, "text": "", "finish_reason": "length"}] and finish["routing"] == {}
