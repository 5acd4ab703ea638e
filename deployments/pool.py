"""The model pool deployment: one vLLM async engine per replica, with ``glimpse`` and ``step``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve

from cluster import metrics
from cluster.pool_config import PoolSettings
from cluster.topology import engine_env, model_dir, tokenizer_dir
from deployments.protocol import Glimpse, NextGlimpse, Prompt, StepChunk, StepSampling

log = logging.getLogger("ray.serve")


def engine_args(settings: PoolSettings) -> dict:
    """vLLM ``AsyncEngineArgs`` keywords for the pool's engine; optional settings only where they are set."""
    eng = settings.engine
    optional = {
        "gpu_memory_utilization": eng.gpu_memory_utilization,
        "kv_cache_memory_bytes": eng.kv_cache_gib * 2**30 if eng.kv_cache_gib and settings.placement.num_gpus else None,
        "max_num_batched_tokens": eng.max_num_batched_tokens,
        "max_cudagraph_capture_size": eng.max_cudagraph_capture_size,
        "compilation_config": {"cudagraph_mode": eng.cudagraph_mode} if eng.cudagraph_mode else None,
        "disable_custom_all_reduce": eng.disable_custom_all_reduce,
    }
    # False is a setting too, so it is kept apart from the optional ones above
    scheduling = {} if eng.async_scheduling is None else {"async_scheduling": eng.async_scheduling}
    return {
        "model": model_dir(settings),
        "tokenizer": tokenizer_dir(settings),
        "served_model_name": settings.model.name,
        "load_format": settings.model.load_format,
        "dtype": eng.dtype,
        "max_model_len": eng.max_model_len,
        "enable_prefix_caching": eng.enable_prefix_caching,
        "max_logprobs": eng.max_logprobs,
        "max_num_seqs": eng.max_num_seqs,
        "tensor_parallel_size": eng.tensor_parallel_size,
        "enforce_eager": eng.enforce_eager,
        "stream_interval": eng.stream_interval,
        "scheduling_policy": eng.scheduling_policy,
        "disable_log_stats": False,
        **{key: value for key, value in optional.items() if value},
        **scheduling,
    }


class BusyClock:
    """An engine's busy time, from when its iterations end: the gap before an iteration counts unless the one
    before it left the engine with nothing to run (then the engine waited for a request; that iteration's own
    time is lost with the wait)."""

    def __init__(self):
        self.last: float | None = None
        self.active = False

    def tick(self, now: float, active_after: bool) -> float:
        """Seconds to add for the iteration that ended at ``now``; ``active_after``: work was left after it."""
        busy = now - self.last if self.last is not None and self.active else 0.0
        self.last, self.active = now, active_after
        return busy

    def iteration(self, now: float, scheduler_stats, iteration_stats) -> tuple[str, float]:
        """From vLLM's stats of the iteration that ended at ``now``: its phase and the busy seconds to add."""
        return iteration_phase(iteration_stats), self.tick(now, work_left(scheduler_stats, iteration_stats))


PHASES = ("decode", "mixed")  # an engine iteration's phase: it computed prefill tokens (mixed) or not


def iteration_phase(iteration_stats) -> str:
    """``mixed`` for an engine iteration that computed prefill tokens, else ``decode``."""
    return PHASES[bool(iteration_stats.prompt_token_stats.computed)]


def work_left(scheduler_stats, iteration_stats) -> bool:
    """Whether the engine had work after an iteration: waiting requests, or running ones it did not finish."""
    return scheduler_stats is not None and (
        scheduler_stats.num_waiting_reqs > 0
        or scheduler_stats.num_running_reqs > len(iteration_stats.finished_requests)
    )


CALLS = ("glimpse", "generate")  # an engine request: a glimpse (one token), or a step or final answer
REQUEST_PARTS = ("queued", "running", "total")


def request_times(finished) -> tuple[str, dict[str, float]]:
    """A finished engine request's kind (see ``CALLS``) and its seconds: ``queued`` (waiting to be scheduled),
    ``running`` (first scheduled to last token) and ``total`` (from its arrival in the engine's front end to its
    last output there; the rest of it is the way in and out of the engine core)."""
    parts = (finished.queued_time, finished.inference_time, finished.e2e_latency)
    times = dict(zip(REQUEST_PARTS, parts, strict=True))
    return CALLS[finished.max_tokens_param != 1], times


def engine_stats_logger(role: str, now=time.monotonic):
    """A vLLM stat-logger factory that exports, per pool, the scheduler's waiting requests (queue depth) and, as
    counters (exact, where Ray exports a histogram's sum from its bucket midpoints), the engine's iterations and its
    busy time (see ``BusyClock``; ``now`` reads the clock), both by phase (``mixed``: the iteration computed
    prefill tokens, else ``decode``), the decode and prefill tokens its iterations computed, and the requests that
    ran to their end (a stop or their token limit) with their times (see ``request_times``)."""
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.loggers import StatLoggerBase

    ran_to_end = (FinishReason.STOP, FinishReason.LENGTH)

    class EngineStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.clock = BusyClock()

        def record(self, scheduler_stats, iteration_stats, *args, **kwargs) -> None:
            if scheduler_stats is not None:
                metrics.set_gauge("glimprouter_pool_queue_depth", scheduler_stats.num_waiting_reqs, pool=role)
            if iteration_stats is not None:
                phase, busy = self.clock.iteration(now(), scheduler_stats, iteration_stats)
                metrics.inc("glimprouter_engine_iterations", pool=role, phase=phase)
                if busy:
                    metrics.inc("glimprouter_engine_busy_seconds", busy, pool=role, phase=phase)
                for kind, tokens in (
                    ("decode", iteration_stats.num_generation_tokens),
                    ("prefill", iteration_stats.prompt_token_stats.computed),
                ):
                    if tokens:
                        metrics.inc("glimprouter_engine_tokens", tokens, pool=role, kind=kind)
                for finished in iteration_stats.finished_requests:
                    if finished.finish_reason in ran_to_end:
                        call, times = request_times(finished)
                        metrics.inc("glimprouter_engine_requests", pool=role, call=call)
                        for part, seconds in times.items():
                            if seconds > 0:  # a Ray counter takes only positive increments
                                metrics.inc(
                                    "glimprouter_engine_request_seconds", seconds, pool=role, call=call, part=part
                                )

        def log_engine_initialized(self) -> None:
            pass

    return EngineStatsLogger


def _engine_prompt(prompt: Prompt):
    from vllm.inputs import TextPrompt, TokensPrompt

    if isinstance(prompt, str):
        return TextPrompt(prompt=prompt)
    return TokensPrompt(prompt_token_ids=list(prompt))


def _first_token_glimpse(output, top_k: int) -> Glimpse:
    """The glimpse read from a request's first output: its first token's top-k log-probs, most likely first."""
    out = output.outputs[0]
    ranked = sorted(out.logprobs[0].items(), key=lambda kv: kv[1].logprob, reverse=True)[:top_k]
    return Glimpse(
        token_id=ranked[0][0],
        token=ranked[0][1].decoded_token or "",
        top_logprobs=[lp.logprob for _, lp in ranked],
        top_tokens=[lp.decoded_token or "" for _, lp in ranked],
        prompt_tokens=len(output.prompt_token_ids or ()),
        cached_tokens=output.num_cached_tokens or 0,
    )


class ModelPool:
    """A replica of one pool. Deployed under its role's name in ``cluster/topology.py`` by the builder."""

    def __init__(self, role: str, settings: PoolSettings):
        for key, value in engine_env(settings).items():
            os.environ.setdefault(key, value)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.role = role
        self.replica = serve.get_replica_context().replica_id.unique_id
        if settings.model.embedded and not os.path.isdir(model_dir(settings)):
            raise RuntimeError(
                f"embedded model {settings.model.embedded!r} is not converted at {model_dir(settings)}: "
                "run `python -m cluster.ops.models` (the launcher does) before the pools start"
            )
        args = AsyncEngineArgs(**engine_args(settings))
        log.info("%s pool replica %s: starting vLLM engine for %s", role, self.replica, args.model)
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[RayPrometheusStatLogger, engine_stats_logger(role)])
        self.ongoing = 0
        log.info("%s pool replica %s: engine ready", role, self.replica)

    def __del__(self):
        """Serve calls this on graceful shutdown: stop the engine's processes with the replica."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def check_health(self) -> None:
        """Serve's health check: healthy only while the engine answers."""
        await self.engine.check_health()

    async def glimpse(
        self, prompt: Prompt, top_k: int = 20, affinity_key: str | None = None, priority: int = 0
    ) -> Glimpse:
        """One greedy token with its top-k log-probs (sorted, most likely first). ``priority``: vLLM's request
        priority (lower first; only with the engine's ``scheduling_policy: priority``)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self._generate(prompt, params, priority):
            final = output
        return _first_token_glimpse(final, top_k)

    async def step(
        self,
        prompt: Prompt,
        sampling: StepSampling,
        stream: bool = False,
        affinity_key: str | None = None,
        next_glimpse: NextGlimpse | None = None,
        glimpse_top_k: int | None = None,
        priority: int = 0,
    ) -> AsyncIterator[StepChunk]:
        """Generate until a stop string, EOS or ``max_tokens`` (``priority``: as for ``glimpse``).

        With ``glimpse_top_k``, the first item carries the step's own glimpse: its first token's top-k raw
        log-probs, the distribution a separate glimpse reads (the caller may cancel the call there). Yields text
        deltas as they come when ``stream`` is set (else nothing but the last item), then one ``done`` chunk
        holding the whole text, the engine's token counts and the finish reason, and, when ``next_glimpse``
        asks for it, the next step's glimpse (see ``_glimpse_after``).
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            logprobs=glimpse_top_k,
            output_kind=RequestOutputKind.DELTA if stream or glimpse_top_k else RequestOutputKind.FINAL_ONLY,
        )
        text, token_ids, last = [], [], None
        async for output in self._generate(prompt, params, priority):
            delta = output.outputs[0]
            text.append(delta.text)
            token_ids.extend(delta.token_ids)
            if glimpse_top_k and last is None:
                yield StepChunk(text=delta.text if stream else "", glimpse=_first_token_glimpse(output, glimpse_top_k))
            elif stream and delta.text:
                yield StepChunk(text=delta.text)
            last = output
        out, whole = last.outputs[0], "".join(text)
        yield StepChunk(
            text=whole,
            done=True,
            prompt_tokens=len(last.prompt_token_ids or ()),
            cached_tokens=last.num_cached_tokens or 0,
            output_tokens=len(token_ids),
            output_token_ids=tuple(token_ids),
            finish_reason=out.finish_reason,
            stopped_by=out.stop_reason if isinstance(out.stop_reason, str) else None,
            next_glimpse=await self._glimpse_after(last, whole, next_glimpse, priority) if next_glimpse else None,
        )

    async def _glimpse_after(self, output, text: str, request: NextGlimpse, priority: int = 0) -> Glimpse | None:
        """The fused glimpse: the next step's first token on the next step's prompt as the router renders it,
        which is this step's prompt, its text and the delimiter, tokenized again (the router re-tokenizes the
        whole thinking text at every step, and a tokenizer may write an inner delimiter as other tokens than
        the model wrote). None after EOS, which ends the thinking."""
        out = output.outputs[0]
        if out.finish_reason != "length" and out.stop_reason != request.delimiter:
            return None
        t0 = time.perf_counter()
        ids = await asyncio.to_thread(self._next_prompt, list(output.prompt_token_ids or ()), text, request.delimiter)
        glimpse = await self.glimpse(ids, request.top_k, priority=priority)
        return dataclasses.replace(glimpse, ms=round((time.perf_counter() - t0) * 1e3, 3), prompt_ids=tuple(ids))

    def _next_prompt(self, prompt_ids: list[int], text: str, delimiter: str) -> list[int]:
        tokenizer = self.engine.get_tokenizer()  # the engine's own, safe to use from threads
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return tokenizer.encode(prompt + text + delimiter, add_special_tokens=False)

    async def _generate(self, prompt: Prompt, params, priority: int = 0):
        """The engine's outputs for one call; cancelling the caller aborts the engine request."""
        self._count_ongoing(+1)
        try:
            request_id = f"{self.role}-{uuid.uuid4().hex}"
            call = self.engine.generate(_engine_prompt(prompt), params, request_id=request_id, priority=priority)
            async with aclosing(call) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self._count_ongoing(-1)

    def _count_ongoing(self, change: int) -> None:
        self.ongoing += change
        metrics.set_gauge("glimprouter_pool_ongoing_requests", self.ongoing, pool=self.role)
