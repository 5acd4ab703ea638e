"""Drive one in-process vLLM engine core for the engine sweep (``loadtests.engine_sweep``): steady loads of
decoding requests with arrivals, timed by the intervals between the core's outputs.

``Engine`` adapts vLLM's ``LLMEngine`` built with its core in the process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
``Driver`` runs loads on it, or on any object with ``Engine``'s methods (the tests' fake core).
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass, field

STEP = {"temperature": 0.6, "top_p": 0.95}  # the benchmark's step sampling
GLIMPSE_TOKENS = 97  # a step of 96 tokens and the delimiter: what a glimpse prefills on the cached prompt


@dataclass(frozen=True)
class Load:
    """A steady load: ``seqs`` requests decoding on prompts of ``context`` tokens with ``decode`` sampling, and every
    ``every``-th iteration one more request of ``prefill`` fresh tokens on a cached prompt (``arrival`` sampling,
    one token: a glimpse or the start of a step)."""

    seqs: int
    context: int
    decode: dict = field(default_factory=lambda: dict(STEP))
    prefill: int = 0
    every: int = 1
    arrival: dict = field(default_factory=lambda: {"temperature": 0.0})


class Engine:
    """The in-process vLLM engine core: add and abort requests by token ids, step the core (no output processing),
    and a log of each scheduled batch's shape: (decode sequences, prefill tokens)."""

    def __init__(self, llm_engine):
        self.llm, self.client = llm_engine, llm_engine.engine_core
        self.core = self.client.engine_core
        self.batches: list[tuple[int, int]] = []
        self.finished: set[str] = set()
        schedule = self.core.scheduler.schedule

        def logged(*args, **kwargs):
            out = schedule(*args, **kwargs)
            counts = out.num_scheduled_tokens.values()
            if counts:
                self.batches.append((sum(n == 1 for n in counts), sum(n for n in counts if n > 1)))
            return out

        self.core.scheduler.schedule = logged
        cache = self.core.vllm_config.cache_config
        self.capacity_tokens = cache.num_gpu_blocks * cache.block_size
        self.async_scheduling = bool(self.core.vllm_config.scheduler_config.async_scheduling)

    def add(self, prompt: list[int], max_tokens: int, **sampling) -> str:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False, **sampling)
        return self.llm.add_request(f"r{random.getrandbits(48):x}", TokensPrompt(prompt_token_ids=prompt), params)

    def abort(self, ids: list[str]) -> None:
        self.client.abort_requests(list(ids))

    def step(self) -> bool:
        """One call of the core's loop; True when it returned an iteration's outputs."""
        outputs, executed = self.core.step_fn()
        self.core.post_step(model_executed=executed)
        if not outputs:
            return False
        for out in outputs.values():
            self.finished.update(o.request_id for o in out.outputs if o.finished)
        return True

    def unfinished(self) -> int:
        return self.core.scheduler.get_num_unfinished_requests()


def fresh(n: int, rnd: random.Random) -> list[int]:
    return [rnd.randrange(1000, 150_000) for _ in range(n)]


class Driver:
    """Runs loads on an engine (the real one or a fake with ``Engine``'s methods) and times them."""

    def __init__(self, engine, rnd: random.Random | None = None, clock=time.perf_counter):
        self.engine, self.rnd, self.clock = engine, rnd or random.Random(0), clock

    def timed(self, iterations: int, before_step=None) -> tuple[list[float], list[tuple[int, int]]]:
        """Milliseconds between the core's outputs over ``iterations`` iterations, and the batches scheduled then;
        ``before_step(i)`` runs before each call of the loop."""
        marks, first_batch, calls = [], len(self.engine.batches), 0
        while len(marks) <= iterations:
            if before_step:
                before_step(calls)
            calls += 1
            if self.engine.step():
                marks.append(self.clock())
            if calls > 20 * iterations + 100:
                raise RuntimeError("the engine stopped returning outputs")
        return [1e3 * (b - a) for a, b in itertools.pairwise(marks)], self.engine.batches[first_batch:]

    def start_decoding(self, seqs: int, context: int, sampling: dict, max_tokens: int = 2000) -> dict[str, list[int]]:
        """``seqs`` requests on fresh prompts of ``context`` tokens, stepped until every one decodes."""
        prompts = {}
        for _ in range(seqs):
            prompt = fresh(context, self.rnd)
            prompts[self.engine.add(prompt, max_tokens, **sampling)] = prompt
        for _ in range(20 + seqs * context // 256):
            self.engine.step()
            if self.engine.batches and self.engine.batches[-1] == (seqs, 0):
                return prompts
        raise RuntimeError(f"{seqs} requests of {context} tokens did not all reach decode")

    def arrivals(self, load: Load, prefix: list[int]):
        """``before_step`` for ``timed``: every ``load.every``-th call, a request of ``load.prefill`` fresh tokens
        on ``prefix``."""
        if not load.prefill:
            return None

        def add(call: int) -> None:
            if call % load.every == 0:
                self.engine.add(prefix + fresh(load.prefill, self.rnd), 1, **load.arrival)

        return add

    def drain(self, ids) -> None:
        self.engine.abort(list(ids))
        for _ in range(1000):
            if not self.engine.unfinished():
                return
            self.engine.step()

    def sweep(
        self, decode_seqs: list[int], prefills: list[int], contexts: list[int], iterations: int, warmup: int = 3
    ) -> list[dict]:
        """Rows of iteration time by (decode sequences, prefill tokens per iteration, context tokens)."""
        rows = []
        for context in contexts:
            room = (self.engine.capacity_tokens - context - max(prefills) - 64) // (context + 400)
            fits = sorted((n for n in decode_seqs if n <= room), reverse=True)
            if not fits:
                continue
            prompts = self.start_decoding(fits[0], context, STEP)
            ids, steps = list(prompts), 0
            for seqs in fits:
                self.engine.abort(ids[seqs:])
                ids = ids[:seqs]
                steps += len(self.timed(warmup)[0]) + 1
                for prefill in prefills:
                    adder = self.arrivals(Load(seqs, context, prefill=prefill), prompts[ids[0]])
                    ms, batches = self.timed(iterations, adder)
                    steps += len(ms) + 1
                    rows.append(
                        {
                            "decode_seqs": seqs,
                            "prefill_tokens": prefill,
                            "context_tokens": context,
                            **timing(ms, batches),
                            "context_tokens_mean": context + steps,
                        }
                    )
                    if prefill:
                        self.timed(2)  # the last arrival's prefill leaves the batch
                        steps += 3
            self.drain(ids)
        return rows

    def steady(self, load: Load, iterations: int, warmup: int = 10) -> dict:
        """``load`` timed over ``iterations`` iterations."""
        prompts = self.start_decoding(load.seqs, load.context, load.decode)
        self.timed(warmup, self.arrivals(load, next(iter(prompts.values()))))
        ms, batches = self.timed(iterations, self.arrivals(load, next(iter(prompts.values()))))
        self.drain(prompts)
        return timing(ms, batches)

    def busy(self, load: Load, stop, started=None, check_every: int = 8) -> dict:
        """``load`` kept up (a decoding request that ends is replaced) until ``stop()``; ``started()`` once it
        decodes. Its iteration time over the whole of it."""
        ids: set[str] = set()

        def top_up() -> None:
            ids.difference_update(self.engine.finished)
            self.engine.finished.clear()
            for _ in range(load.seqs - len(ids)):
                ids.add(self.engine.add(fresh(load.context, self.rnd), self.rnd.randrange(500, 2500), **load.decode))

        top_up()
        prefix = fresh(load.context, self.rnd)
        add = self.arrivals(load, prefix)
        for _ in range(20 + load.seqs * load.context // 256):
            self.engine.step()
            if self.engine.batches and self.engine.batches[-1][0] >= load.seqs:
                break
        if started:
            started()
        marks, first_batch, calls = [self.clock()], len(self.engine.batches), 0
        while True:
            if add:
                add(calls)
            calls += 1
            if self.engine.step():
                marks.append(self.clock())
            if calls % check_every == 0:
                top_up()
                if stop():
                    break
        self.drain(ids)
        ms = [1e3 * (b - a) for a, b in itertools.pairwise(marks)]
        return timing(ms, self.engine.batches[first_batch:]) if ms else {}


def timing(ms: list[float], batches: list[tuple[int, int]]) -> dict:
    """Mean and median iteration milliseconds, and the batches' mean shape."""
    return {
        "iter_ms": round(statistics.fmean(ms), 3),
        "iter_ms_p50": round(statistics.median(ms), 3),
        "iterations": len(ms),
        "measured_decode_seqs": round(statistics.fmean(b[0] for b in batches), 1) if batches else 0.0,
        "measured_prefill_tokens": round(statistics.fmean(b[1] for b in batches), 1) if batches else 0.0,
    }
