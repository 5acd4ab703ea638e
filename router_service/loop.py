"""The step loop of glimprouter-algorithm.md over two pools: glimpse, decide, step, stop, final answer.

The loop knows nothing of Redis or HTTP: it yields events, and the caller persists each complete
step before asking for the next (the generator is suspended at the ``yield`` until then).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from cluster.config import PolicySettings, PoolRole, PriorityClass, StepSettings
from deployments.protocol import Glimpse, NextGlimpse, Prompt, StepChunk, StepSampling
from router_service.budgets import LargeStepBudgets
from router_service.policy import decide, needs_glimpse
from router_service.prompts import THINK_CLOSE, PromptRenderer
from router_service.state import StepRecord
from router_service.tau_control import TauController


class PoolClient(Protocol):
    """What the loop needs of a pool (a Ray Serve handle wrapper, or a fake in unit tests)."""

    async def glimpse(self, prompt: Prompt, top_k: int, affinity_key: str) -> Glimpse: ...

    def step(
        self,
        prompt: Prompt,
        sampling: StepSampling,
        stream: bool,
        affinity_key: str,
        next_glimpse: NextGlimpse | None = None,
        glimpse_top_k: int | None = None,
    ) -> AsyncIterator[StepChunk]: ...


@dataclass(frozen=True)
class LoopRequest:
    """One request as the loop sees it."""

    request_id: str
    messages: list[dict]
    policy: PolicySettings
    steps: StepSettings
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    tau_bounds: tuple[float | None, float | None] = (None, None)  # the tenant's floor and ceiling of tau
    tenant: str = ""  # whose request (large-step budgets are the tenant's)
    priority: PriorityClass = "standard"  # its class (the tau controller's offset is the class's)


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of the step being written (only when streaming)."""

    text: str


@dataclass(frozen=True)
class StepDone:
    """A complete step: persist it before resuming the loop."""

    record: StepRecord
    glimpsed: bool
    next_glimpse: Glimpse | None = None  # the fused glimpse for the next step, if the step call gave one


@dataclass(frozen=True)
class AnswerDelta:
    """Text of the final answer (only when streaming)."""

    text: str


@dataclass(frozen=True)
class AnswerDone:
    """The final answer and its engine counts."""

    pool: PoolRole
    text: str
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    finish_reason: str | None
    ms: float


LoopEvent = ReasoningDelta | StepDone | AnswerDelta | AnswerDone


async def _continued(first: StepChunk, rest: AsyncIterator[StepChunk]) -> AsyncIterator[StepChunk]:
    """A step call's items again, its first one already read."""
    yield first
    async for chunk in rest:
        yield chunk


def thinking_finished(steps: list[StepRecord], cfg: StepSettings) -> bool:
    """The reference's stop rules, checked after each step: ``</think>`` in the last step, more than two steps
    and the last two identical, the budget reached (the step that reaches it is kept whole). An EOS step stops
    thinking only with the ``stop_on_eos`` variant."""
    if not steps:
        return False
    last = steps[-1]
    if THINK_CLOSE in last.text or (cfg.stop_on_eos and last.ended_by_eos):
        return True
    if len(steps) > 2 and steps[-1].text == steps[-2].text:
        return True
    return sum(s.output_tokens for s in steps) >= cfg.reasoning_budget()


def step_max_tokens(cfg: StepSettings, used: int) -> int:
    """A step's token limit after ``used`` output tokens: the full per-step maximum (the reference), capped at what
    is left of the budget with ``cap_last_step`` and always at what is left of a completion limit."""
    limits = [cfg.step_max_tokens]
    if cfg.cap_last_step:
        limits.append(cfg.token_budget - used)
    if cfg.completion_limit is not None:
        limits.append(cfg.completion_limit - used)
    return min(limits)


def answer_max_tokens(cfg: StepSettings, used: int) -> int:
    """The final answer's token limit: final_max_tokens, within what the steps left of a completion limit."""
    if cfg.completion_limit is None:
        return cfg.final_max_tokens
    return max(0, min(cfg.final_max_tokens, cfg.completion_limit - used))


class StepLoop:
    """Runs requests over a small and a large pool."""

    def __init__(
        self,
        pools: Mapping[PoolRole, PoolClient],
        renderers: Mapping[PoolRole, PromptRenderer],
        tau_controller: TauController | None = None,
        budgets: LargeStepBudgets | None = None,
    ):
        self.pools = pools
        self.renderers = renderers
        self.tau_controller = tau_controller
        self.budgets = budgets

    async def run(self, req: LoopRequest, done: list[StepRecord]) -> AsyncIterator[LoopEvent]:
        """Continue ``req`` after its complete steps ``done`` (empty for a new request).

        Yields ``ReasoningDelta`` (streaming only) while a step is written, one ``StepDone`` per step,
        then ``AnswerDelta`` (streaming only) and one ``AnswerDone``.
        """
        cfg = req.steps
        steps, fused = list(done), None
        while not thinking_finished(steps, cfg):
            record = None
            async for event in self._one_step(req, steps, fused):
                if isinstance(event, StepDone):
                    record, fused = event.record, event.next_glimpse
                yield event
            steps.append(record)
        async for event in self._final_answer(req, [s.text for s in steps], sum(s.output_tokens for s in steps)):
            yield event

    async def _one_step(
        self, req: LoopRequest, steps: list[StepRecord], fused: Glimpse | None
    ) -> AsyncIterator[LoopEvent]:
        """One step; ``fused`` is its glimpse when the previous step's call already took it."""
        cfg, index = req.steps, len(steps)
        texts = [s.text for s in steps]
        # each pool's prompt, rendered once and only when needed (a fused glimpse brings the small pool's)
        prompts: dict[PoolRole, Prompt] = {"small": list(fused.prompt_ids)} if fused is not None else {}

        def prompt_for(pool: PoolRole) -> Prompt:
            if pool not in prompts:
                prompts[pool] = self.renderers[pool].step_prompt(req.messages, texts, cfg.delimiter)
            return prompts[pool]

        # the tau in force: a large-step budget's (router_service/budgets.py), plus the class's load offset
        policy = self.budgets.steer(req.tenant, req.request_id, req.policy) if self.budgets else req.policy
        policy = self.tau_controller.apply(policy, *req.tau_bounds, req.priority) if self.tau_controller else policy
        glimpsed = needs_glimpse(policy)
        used = sum(s.output_tokens for s in steps)
        sampling = StepSampling(
            max_tokens=step_max_tokens(cfg, used),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=[cfg.delimiter],
            seed=None if req.seed is None else req.seed + index,
            ignore_eos=cfg.ignore_eos,
        )
        glimpse_ms, logprobs, small_call, glimpse = 0.0, None, None, None  # glimpse: one a call of its own prefilled
        t0 = time.perf_counter()
        if glimpsed and fused is not None:
            glimpse_ms, logprobs, glimpse = fused.ms, fused.top_logprobs, fused
        elif glimpsed and policy.glimpse_in_step:  # the small step call glimpses: its first item holds the glimpse
            small_call = self.pools["small"].step(
                prompt_for("small"), sampling, req.stream, req.request_id, glimpse_top_k=cfg.top_k
            )
            first = await anext(small_call)
            glimpse_ms, logprobs = (time.perf_counter() - t0) * 1e3, first.glimpse.top_logprobs
        elif glimpsed:
            glimpse = await self.pools["small"].glimpse(prompt_for("small"), cfg.top_k, req.request_id)
            glimpse_ms, logprobs = (time.perf_counter() - t0) * 1e3, glimpse.top_logprobs
        decision = decide(policy, logprobs, req.request_id, index)
        if self.budgets is not None:
            self.budgets.observe(req.request_id, decision.entropy)
        if small_call is not None and decision.pool == "small":
            chunks = _continued(first, small_call)
        else:
            if small_call is not None:
                await small_call.aclose()  # the large pool writes the step: the small call stops after its first token
            # fuse the next glimpse into a small step that leaves budget for another step; not into step 0, whose
            # prompt (the generation prompt) is not a prefix of step 1's ("<think>" opens the assistant turn)
            ask_next = (
                glimpsed
                and policy.fused_glimpse
                and decision.pool == "small"
                and index > 0
                and used + sampling.max_tokens < cfg.reasoning_budget()
            )
            chunks = self.pools[decision.pool].step(
                prompt_for(decision.pool),
                sampling,
                req.stream,
                req.request_id,
                NextGlimpse(cfg.top_k, cfg.delimiter) if ask_next else None,
            )
        t0 = time.perf_counter()
        last = None
        async for chunk in chunks:
            if chunk.done:
                last = chunk
            elif chunk.text:
                yield ReasoningDelta(chunk.text)
        step_ms = (time.perf_counter() - t0) * 1e3 - (last.next_glimpse.ms if last.next_glimpse else 0.0)
        yield StepDone(
            StepRecord(
                index=index,
                pool=decision.pool,
                entropy=decision.entropy,
                text=last.text,
                output_tokens=last.output_tokens,
                prompt_tokens=last.prompt_tokens,
                cached_tokens=last.cached_tokens,
                glimpse_ms=round(glimpse_ms, 3),
                step_ms=round(step_ms, 3),
                finish_reason=last.finish_reason,
                ended_by_eos=last.ended_by_eos,
                glimpse_fused=glimpsed and fused is not None,
                glimpse_prompt_tokens=glimpse.prompt_tokens if glimpse else 0,
                glimpse_cached_tokens=glimpse.cached_tokens if glimpse else 0,
            ),
            glimpsed,
            last.next_glimpse,
        )

    async def _final_answer(self, req: LoopRequest, texts: list[str], used: int) -> AsyncIterator[LoopEvent]:
        pool: PoolRole = "small" if req.policy.policy == "small_only" else "large"
        max_tokens = answer_max_tokens(req.steps, used)
        if max_tokens == 0:  # the steps took the whole completion limit: an empty answer, as OpenAI's models give
            yield AnswerDone(pool, "", 0, 0, 0, "length", 0.0)
            return
        prompt = self.renderers[pool].final_prompt(req.messages, texts, req.steps.delimiter)
        sampling = StepSampling(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            ignore_eos=req.steps.ignore_eos,
        )
        t0 = time.perf_counter()
        async for chunk in self.pools[pool].step(prompt, sampling, req.stream, req.request_id):
            if not chunk.done:
                yield AnswerDelta(chunk.text)
                continue
            yield AnswerDone(
                pool,
                chunk.text,
                chunk.prompt_tokens,
                chunk.cached_tokens,
                chunk.output_tokens,
                chunk.finish_reason,
                round((time.perf_counter() - t0) * 1e3, 3),
            )
