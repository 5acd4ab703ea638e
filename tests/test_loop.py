"""The step loop over fake pools and renderers: glimpse, route, stop rules, final answer, resume, streaming."""

from __future__ import annotations

import math

import pytest
from fakes import ANSWER, HIGH, LOW, MESSAGES, FakePool, FakeRenderer, Out

from cluster.config import PolicySettings, StepSettings
from deployments.protocol import NextGlimpse, StepSampling
from router_service.loop import (
    AnswerDelta,
    AnswerDone,
    LoopRequest,
    ReasoningDelta,
    StepDone,
    StepLoop,
    thinking_finished,
)
from router_service.state import StepRecord


def request(
    policy="glimprouter", *, stream=False, temperature=0.6, seed=None, fused=False, in_step=False, **steps
) -> LoopRequest:
    settings = PolicySettings(
        policy=policy,
        tau=1.0,
        large_fraction=1.0 if policy == "random" else 0.25,
        fused_glimpse=fused,
        glimpse_in_step=in_step,
    )
    return LoopRequest("req-1", MESSAGES, settings, StepSettings(**steps), temperature, 0.95, seed, stream)


async def run(req, small, large, done=(), renderers=None):
    renderers = renderers or {"small": FakeRenderer("small"), "large": FakeRenderer("large")}
    loop = StepLoop({"small": small, "large": large}, renderers)
    return [e async for e in loop.run(req, list(done))]


def steps_of(events) -> list[StepRecord]:
    return [e.record for e in events if isinstance(e, StepDone)]


def rec(text="s", tokens=4, eos=False, index=0) -> StepRecord:
    return StepRecord(index, "small", None, text, tokens, 10, 0, 0.0, 0.0, "stop", eos)


# the reference's stop rules (glimprouter-algorithm.md, "Stopping the thinking phase"), and the variants
@pytest.mark.parametrize(
    "steps, budget, stop_on_eos, finished",
    [
        ([], 100, False, False),
        ([rec("a")], 100, False, False),
        ([rec("a</think>b")], 100, False, True),
        ([rec("a", eos=True)], 100, False, False),  # the reference has no EOS rule
        ([rec("a", eos=True)], 100, True, True),  # the stop_on_eos variant
        ([rec("a"), rec("a")], 100, False, False),  # two identical steps are not yet "more than two"
        ([rec("a"), rec("b"), rec("b")], 100, False, True),
        ([rec("b"), rec("b"), rec("c")], 100, False, False),
        ([rec(tokens=4), rec(tokens=5)], 9, False, True),
        ([rec(tokens=4), rec(tokens=6)], 9, False, True),  # the step that crosses the budget ends thinking
        ([rec(tokens=4), rec(tokens=5)], 10, False, False),
    ],
)
def test_thinking_finished(steps, budget, stop_on_eos, finished):
    assert thinking_finished(steps, StepSettings(token_budget=budget, stop_on_eos=stop_on_eos)) is finished


@pytest.mark.parametrize(
    "outputs",
    [
        [Out("a"), Out("b </think> c")],
        [Out("x"), Out("x"), Out("y"), Out("y")],
    ],
)
async def test_stop_rules_end_thinking(outputs):
    large = FakePool([*outputs, Out(ANSWER)])
    events = await run(request("large_only"), FakePool(), large)
    assert [s.text for s in steps_of(events)] == [o.text for o in outputs]
    assert len(large.of("step")) == len(outputs) + 1  # no step after the stop, then the answer


async def test_an_eos_step_does_not_end_thinking_but_with_stop_on_eos():
    outputs = [Out("a"), Out("b", eos=True), Out("c </think>"), Out(ANSWER)]
    reference = await run(request("large_only"), FakePool(), FakePool(outputs))
    assert [s.text for s in steps_of(reference)] == ["a", "b", "c </think>"]  # the next step from the prefix
    assert steps_of(reference)[1].ended_by_eos
    variant = await run(request("large_only", stop_on_eos=True), FakePool(), FakePool(outputs))
    assert [s.text for s in steps_of(variant)] == ["a", "b"]


async def test_every_step_gets_its_full_maximum_and_the_crossing_step_is_kept():
    large = FakePool([Out("a", None), Out("b", None), Out("c", None), Out(ANSWER)])
    events = await run(request("large_only", token_budget=12, step_max_tokens=5), FakePool(), large)
    assert [s.output_tokens for s in steps_of(events)] == [5, 5, 5]  # 15 >= 12: stop after the third, whole
    assert [c.arg.max_tokens for c in large.of("step")] == [5, 5, 5, 2048]


async def test_cap_last_step_caps_the_last_step_at_the_budget():
    large = FakePool([Out("a", None), Out("b", None), Out("c", None), Out(ANSWER)])
    events = await run(request("large_only", token_budget=12, step_max_tokens=5, cap_last_step=True), FakePool(), large)
    assert [s.output_tokens for s in steps_of(events)] == [5, 5, 2]
    assert [c.arg.max_tokens for c in large.of("step")] == [5, 5, 2, 2048]


async def test_a_completion_limit_bounds_steps_and_answer_together():
    large = FakePool([Out("a", None), Out("b", None), Out(ANSWER, None)])
    events = await run(request("large_only", token_budget=8, step_max_tokens=5, completion_limit=12), FakePool(), large)
    # the step crossing the budget is kept whole (within the limit); the answer gets what is left: 12 - 10
    assert [s.output_tokens for s in steps_of(events)] == [5, 5]
    assert [c.arg.max_tokens for c in large.of("step")] == [5, 5, 2]
    assert events[-1].output_tokens == 2


async def test_a_completion_limit_the_steps_spend_leaves_an_empty_answer():
    large = FakePool([Out("a", None), Out("b", None)])
    events = await run(
        request("large_only", token_budget=10, step_max_tokens=5, completion_limit=10), FakePool(), large
    )
    assert [s.output_tokens for s in steps_of(events)] == [5, 5]
    assert len(large.calls) == 2  # no answer call: nothing was left for it
    assert events[-1] == AnswerDone("large", "", 0, 0, 0, "length", 0.0)


async def test_glimprouter_routes_by_entropy_and_large_answers():
    small = FakePool([Out("s0"), Out("s2 </think>")], glimpses=[LOW, HIGH, LOW])
    large = FakePool([Out("l1"), Out(ANSWER, tokens=6)])
    events = await run(request(top_k=5, seed=100), small, large)

    steps = steps_of(events)
    assert [(s.index, s.pool, s.text) for s in steps] == [
        (0, "small", "s0"),
        (1, "large", "l1"),
        (2, "small", "s2 </think>"),
    ]
    assert steps[1].entropy == pytest.approx(math.log(20)) and steps[0].entropy < 1e-20
    assert all(isinstance(e, StepDone) and e.glimpsed for e in events[:-1])
    # one glimpse (top_k from the settings) before every step, on the prefix the step then uses
    history = [(), ("s0",), ("s0", "l1")]
    assert [c.kind for c in small.calls] == ["glimpse", "step", "glimpse", "glimpse", "step"]
    assert [(c.prompt, c.arg) for c in small.of("glimpse")] == [
        (("small", "step", "What is 6*7?", h, "\n\n"), 5) for h in history
    ]
    assert [c.prompt[3] for c in small.of("step")] == [history[0], history[2]]
    assert large.calls[0].prompt == ("large", "step", "What is 6*7?", history[1], "\n\n")
    assert next(c.arg for c in small.of("step")) == StepSampling(
        max_tokens=512, temperature=0.6, top_p=0.95, stop=["\n\n"], seed=100
    )
    assert large.calls[0].arg.seed == 101
    # the final answer: large pool, final_prompt of all steps, no stop string
    final = large.calls[-1]
    assert final.prompt == ("large", "final", "What is 6*7?", ("s0", "l1", "s2 </think>"), "\n\n")
    assert final.arg == StepSampling(max_tokens=2048, temperature=0.6, top_p=0.95, stop=[], seed=100)
    assert events[-1] == AnswerDone("large", ANSWER, 10, 3, 6, "stop", events[-1].ms)
    assert {c.key for c in small.calls + large.calls} == {"req-1"}


async def test_fused_glimpse_replaces_the_call_after_small_steps():
    small = FakePool([Out("s0"), Out("s1"), Out("s3 </think>")], glimpses=[LOW, LOW, LOW], fused=[HIGH, LOW])
    large = FakePool([Out("l2"), Out(ANSWER)])
    events = await run(request(fused=True), small, large)

    steps = steps_of(events)
    assert [(s.pool, s.glimpse_fused) for s in steps] == [
        ("small", False),
        ("small", False),
        ("large", True),
        ("small", False),
    ]
    assert steps[2].entropy == pytest.approx(math.log(20)) and steps[2].glimpse_ms == 1.5
    # step 0's prompt is not a prefix of step 1's: no fused glimpse asked there; none after the large step,
    # which the small pool has not seen
    assert [c.kind for c in small.calls] == ["glimpse", "step", "glimpse", "step", "glimpse", "step"]
    assert [c.next_glimpse for c in small.of("step")] == [None] + [NextGlimpse(20, "\n\n")] * 2
    assert [c.next_glimpse for c in large.calls] == [None, None]


async def test_fused_glimpse_falls_back_to_a_call():
    """A step call that returns no fused glimpse leaves the next glimpse to a separate call; a step that spends
    the budget does not ask for one."""
    small = FakePool([Out("s0"), Out("s1"), Out("s2", tokens=None)], glimpses=[LOW, LOW, LOW])
    events = await run(request(fused=True, token_budget=12, step_max_tokens=4), small, FakePool([Out(ANSWER)]))
    assert [s.glimpse_fused for s in steps_of(events)] == [False, False, False]
    assert [c.kind for c in small.calls] == ["glimpse", "step"] * 3
    assert [c.next_glimpse for c in small.of("step")] == [None, NextGlimpse(20, "\n\n"), None]


async def test_fused_glimpse_prompt_is_the_next_small_steps_prompt():
    """The small step after a fused glimpse runs on the prompt the glimpse was taken on, rendered by nobody
    else."""
    small = FakePool([Out("s0"), Out("s1"), Out("s2", eos=True)], glimpses=[LOW, LOW], fused=[LOW, LOW])
    renderers = {"small": FakeRenderer("small"), "large": FakeRenderer("large")}
    events = await run(request(fused=True, stop_on_eos=True), small, FakePool([Out(ANSWER)]), renderers=renderers)
    assert [s.glimpse_fused for s in steps_of(events)] == [False, False, True]
    assert small.of("step")[2].prompt == [900 + 4]  # the fused glimpse from step 1's call (the 4th call)
    assert renderers["small"].rendered == 2 and renderers["large"].rendered == 0  # steps 0 and 1 only


@pytest.mark.parametrize("stream", [False, True])
async def test_glimpse_in_step_routes_by_the_step_calls_first_token(stream):
    """Each step opens a small step call asking for its own glimpse: a small step goes on in that call (one
    small-pool call per step), a large one closes it after the first item and goes to the large pool; the
    closed call's first token is never shown."""
    small = FakePool([Out("s0"), Out("s2 </think>")], glimpses=[LOW, HIGH, LOW])
    large = FakePool([Out("l1"), Out(ANSWER)])
    events = await run(request(in_step=True, stream=stream, top_k=5), small, large)

    steps = steps_of(events)
    assert [(s.pool, s.text, s.glimpse_fused) for s in steps] == [
        ("small", "s0", False),
        ("large", "l1", False),
        ("small", "s2 </think>", False),
    ]
    assert steps[1].entropy == pytest.approx(math.log(20)) and steps[0].entropy < 1e-20
    assert [(c.kind, c.glimpse_top_k, c.closed_early) for c in small.calls] == [
        ("step", 5, False),
        ("step", 5, True),
        ("step", 5, False),
    ]
    history = [(), ("s0",), ("s0", "l1")]
    assert [c.prompt[3] for c in small.calls] == history and large.calls[0].prompt[3] == history[1]
    assert small.calls[1].arg == large.calls[0].arg  # the same sampling, whichever pool writes the step
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert reasoning == ("<first>s0l1<first>s2 </think>" if stream else "")


def test_fused_and_in_step_glimpses_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        PolicySettings(fused_glimpse=True, glimpse_in_step=True)


async def test_glimpse_ignores_temperature():
    calls = []
    for temperature in (0.0, 1.3):
        small = FakePool([Out("s", eos=True)], glimpses=[LOW])
        await run(request(temperature=temperature, stop_on_eos=True), small, FakePool([Out(ANSWER)]))
        calls.append(([(c.prompt, c.arg) for c in small.of("glimpse")], small.of("step")[0].arg.temperature))
    assert calls[0][0] == calls[1][0]
    assert (calls[0][1], calls[1][1]) == (0.0, 1.3)


@pytest.mark.parametrize("policy", ["large_only", "random"])  # random at large_fraction 1
async def test_large_only_never_calls_small(policy):
    large = FakePool([Out("a"), Out("b", eos=True), Out(ANSWER)])
    small = FakePool()
    renderers = {"small": FakeRenderer("small"), "large": FakeRenderer("large")}
    events = await run(request(policy, stop_on_eos=True), small, large, renderers=renderers)
    assert small.calls == [] and renderers["small"].rendered == 0
    assert [s.pool for s in steps_of(events)] == ["large", "large"]
    assert [s.entropy for s in steps_of(events)] == [None, None]
    assert not any(e.glimpsed for e in events if isinstance(e, StepDone))
    assert events[-1].pool == "large" and large.calls[-1].prompt[1] == "final"


async def test_small_only_never_calls_large():
    small = FakePool([Out("a"), Out("b", eos=True), Out(ANSWER)])
    large = FakePool()
    events = await run(request("small_only", stop_on_eos=True), small, large)
    assert large.calls == [] and small.of("glimpse") == []
    assert [s.pool for s in steps_of(events)] == ["small", "small"]
    assert events[-1].pool == "small" and events[-1].text == ANSWER
    assert small.calls[-1].prompt == ("small", "final", "What is 6*7?", ("a", "b"), "\n\n")


async def test_resume_continues_after_done_steps():
    done = [rec("s0", tokens=10, index=0), rec("s1", tokens=10, index=1)]
    small = FakePool([Out("s2", tokens=5)], glimpses=[LOW])
    large = FakePool([Out(ANSWER)])
    events = await run(request(token_budget=25, seed=100, cap_last_step=True), small, large, done)
    assert [s.index for s in steps_of(events)] == [2]
    assert [(c.kind, c.prompt[3]) for c in small.calls] == [("glimpse", ("s0", "s1")), ("step", ("s0", "s1"))]
    assert small.calls[1].arg.max_tokens == 5 and small.calls[1].arg.seed == 102  # budget counts done steps
    assert large.calls[0].prompt[3] == ("s0", "s1", "s2")


async def test_resume_of_finished_thinking_only_answers():
    large = FakePool([Out(ANSWER)])
    events = await run(request(), FakePool(), large, [rec("s0 </think>")])
    assert [type(e) for e in events] == [AnswerDone] and len(large.calls) == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_deltas_only_when_streaming(stream):
    large = FakePool([Out("abcd", eos=True), Out(ANSWER)])
    events = await run(request("large_only", stream=stream, stop_on_eos=True), FakePool(), large)
    assert [c.stream for c in large.calls] == [stream, stream]
    kinds = [type(e) for e in events]
    if stream:
        assert kinds == [ReasoningDelta, ReasoningDelta, StepDone, AnswerDelta, AnswerDelta, AnswerDone]
        assert "".join(e.text for e in events[:2]) == "abcd"
        assert "".join(e.text for e in events[3:5]) == ANSWER
    else:
        assert kinds == [StepDone, AnswerDone]
