"""Fake pools and renderers for the step loop's and the request service's unit tests (no Ray, no engines)."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.protocol import Glimpse, NextGlimpse, StepChunk, StepSampling

MESSAGES = [{"role": "user", "content": "What is 6*7?"}]
HIGH = [0.0] * 20  # H = ln 20 ~ 3.0: large
LOW = [0.0] + [-60.0] * 19  # H ~ 0: small
ANSWER = "The answer is 42."


@dataclass
class Out:
    """A scripted step result; ``tokens=None`` spends the whole ``max_tokens`` (finish 'length')."""

    text: str
    tokens: int | None = 4
    eos: bool = False


@dataclass
class Call:
    kind: str
    prompt: object
    arg: object  # top_k of a glimpse, StepSampling of a step
    stream: bool | None
    key: str
    next_glimpse: NextGlimpse | None = None
    glimpse_top_k: int | None = None
    closed_early: bool = False


class FakePool:
    """Records every call; answers glimpses and steps from scripts, in order. Like ModelPool, it yields
    text deltas only when asked to stream, and a step asked for its own glimpse yields it first (with the
    first token's text, "<first>", when streaming)."""

    def __init__(self, outputs=(), glimpses=(), fused=()):
        self.outputs, self.glimpses, self.fused, self.calls = list(outputs), list(glimpses), list(fused), []

    async def glimpse(self, prompt, top_k, affinity_key):
        self.calls.append(Call("glimpse", prompt, top_k, None, affinity_key))
        return Glimpse(7, "x", self.glimpses.pop(0), ["x"] * top_k, 10, 0)

    async def step(self, prompt, sampling: StepSampling, stream, affinity_key, next_glimpse=None, glimpse_top_k=None):
        call = Call("step", prompt, sampling, stream, affinity_key, next_glimpse, glimpse_top_k)
        self.calls.append(call)
        if glimpse_top_k:
            try:
                yield StepChunk(
                    "<first>" if stream else "", glimpse=Glimpse(7, "x", self.glimpses.pop(0), ["x"] * 20, 10, 0)
                )
            except GeneratorExit:
                call.closed_early = True
                raise
        out = self.outputs.pop(0)
        if stream:
            half = len(out.text) // 2
            yield StepChunk(out.text[:half])
            yield StepChunk(out.text[half:])
        tokens = sampling.max_tokens if out.tokens is None else out.tokens
        yield StepChunk(
            out.text,
            done=True,
            prompt_tokens=10,
            cached_tokens=3,
            output_tokens=tokens,
            finish_reason="length" if out.tokens is None else "stop",
            stopped_by=None if out.eos or out.tokens is None else "\n\n",
            next_glimpse=Glimpse(
                9, "y", self.fused.pop(0), ["y"] * 20, 10, 9, ms=1.5, prompt_ids=(900 + len(self.calls),)
            )
            if next_glimpse and self.fused
            else None,
        )

    def of(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]


class FakeRenderer:
    def __init__(self, role: str):
        self.role, self.rendered = role, 0

    def step_prompt(self, messages, steps, delimiter):
        self.rendered += 1
        return (self.role, "step", messages[-1]["content"], tuple(steps), delimiter)

    def final_prompt(self, messages, steps, delimiter):
        return (self.role, "final", messages[-1]["content"], tuple(steps), delimiter)
