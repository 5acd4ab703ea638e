"""The small pool's engine alone, in process, under the routed small-pool workload: where its time per
iteration goes.

    python -m loadtests.small_engine_bench [--streams 32] [--seconds 20] [--glimpses lp20,plain,none,instep]
                                           [--set pools.small.engine.cudagraph_mode=PIECEWISE ...]

One vLLM engine configured as the GPU benchmark's small pool (``cluster/configs/gpu-bench.yaml``, random
weights). ``--streams`` requests run at once; each writes steps of 96 tokens on its growing prompt (a
200-token prompt, then each step and the delimiter appended, 16 steps a request), as the router's small steps
do, and takes a glimpse before each step: ``lp20`` is the router's (one greedy token with its top-20
log-probs), ``plain`` one greedy token without log-probs, ``none`` no glimpse, ``instep`` none but top-20
log-probs on every step token (what ``glimpse_in_step`` asks of the engine). ``--set`` overrides a field of
the config (an engine setting under test). For each glimpse kind, after a warm-up, prints the engine's
iterations per second, wall time per iteration, decode tokens and new requests per iteration, and, counted as
the pools count them, its busy fraction and its time per busy iteration by phase (``mixed``: the iteration
computed prefill tokens, so admitted a request; ``decode``: it did not).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from cluster.config import ConfigError, load_config
from cluster.pool_config import PoolSettings
from deployments.pool import BusyClock, engine_args
from loadtests.gpu_bench.layouts import parse_override, with_overrides
from loadtests.gpu_bench.stats import phase_figures
from loadtests.gpu_models import build_model, build_tokenizer

STEP_TOKENS, STEPS, PROMPT_TOKENS = 96, 16, 200
DELIMITER_ID = 271  # a token standing for the step delimiter
GLIMPSES = ("lp20", "plain", "none", "instep")


class Tally(NamedTuple):
    """The engine's counts at one moment: iterations and busy seconds by phase, decode tokens, new requests."""

    iterations: Counter
    busy_s: Counter
    decode_tokens: int
    requests: int


class IterationCounter:
    """Counts the engine's iterations and busy time by phase (as the pools do: ``BusyClock``), its decode tokens
    and the new requests (a vLLM stat logger's view)."""

    def __init__(self, now=time.monotonic):
        self.iterations, self.busy_s = Counter(), Counter()
        self.decode_tokens = self.requests = 0
        self.clock, self.now = BusyClock(), now

    def tally(self) -> Tally:
        return Tally(Counter(self.iterations), Counter(self.busy_s), self.decode_tokens, self.requests)

    def logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        counter = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, *args, **kwargs) -> None:
                if iteration_stats is not None:
                    phase, busy = counter.clock.iteration(counter.now(), scheduler_stats, iteration_stats)
                    counter.iterations[phase] += 1
                    counter.busy_s[phase] += busy
                    counter.decode_tokens += iteration_stats.num_generation_tokens

            def log_engine_initialized(self) -> None:
                pass

        return Logger


async def run_stream(engine, counter: IterationCounter, glimpse: str, seed: int) -> None:
    """One stream of requests: steps with a glimpse before each, until cancelled."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    rnd = random.Random(seed)
    final = RequestOutputKind.FINAL_ONLY
    glimpse_params = SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=20 if glimpse == "lp20" else None, output_kind=final
    )
    step_params = SamplingParams(
        max_tokens=STEP_TOKENS,
        temperature=0.6,
        top_p=0.95,
        stop=["\n\n"],
        ignore_eos=True,
        logprobs=20 if glimpse == "instep" else None,
        output_kind=final,
    )
    while True:
        prompt = [rnd.randrange(1000, 150_000) for _ in range(PROMPT_TOKENS)]
        for _ in range(STEPS):
            calls = [step_params] if glimpse in ("none", "instep") else [glimpse_params, step_params]
            for params in calls:
                counter.requests += 1
                async for out in engine.generate(
                    TokensPrompt(prompt_token_ids=prompt), params, request_id=uuid.uuid4().hex
                ):
                    last = out
            prompt = prompt + list(last.outputs[0].token_ids) + [DELIMITER_ID]


async def measure(
    engine, counter: IterationCounter, glimpse: str, streams: int, warmup_s: float, seconds: float
) -> dict:
    """The engine's figures over ``seconds`` after ``warmup_s`` of ``streams`` streams."""
    tasks = [asyncio.create_task(run_stream(engine, counter, glimpse, seed)) for seed in range(streams)]
    await asyncio.sleep(warmup_s)
    before, t0 = counter.tally(), time.perf_counter()
    await asyncio.sleep(seconds)
    after, wall = counter.tally(), time.perf_counter() - t0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"glimpse": glimpse, "streams": streams, **figures(before, after, wall)}


def figures(before: Tally, after: Tally, wall_s: float) -> dict:
    """The engine's figures between two tallies ``wall_s`` apart."""
    iterations, busy = after.iterations - before.iterations, after.busy_s - before.busy_s
    count = max(sum(iterations.values()), 1)
    return {
        "iterations_per_s": round(count / wall_s, 1),
        "ms_per_iteration": round(wall_s * 1e3 / count, 2),
        "decode_tokens_per_iteration": round((after.decode_tokens - before.decode_tokens) / count, 1),
        "new_requests_per_iteration": round((after.requests - before.requests) / count, 2),
        "busy_fraction": round(sum(busy.values()) / wall_s, 3),
        **phase_figures(iterations, busy),
    }


def small_pool(overrides: dict) -> PoolSettings:
    """The GPU benchmark's small pool, with ``{dotted.path: value}`` overrides of the whole config."""
    data = load_config("gpu-bench").model_dump(mode="json", exclude_none=True)
    return with_overrides(data, overrides, "small_engine_bench").pools.small


async def main_async(args) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    small = args.small
    root = args.models.resolve()
    build_tokenizer(root)
    model = small.model.model_copy(
        update={"path": build_model(root, "qwen2.5-1.5b"), "tokenizer": str(root / "tokenizer")}
    )
    counter = IterationCounter()
    print(f"starting the small engine (CUDA graphs: about a minute); overrides {args.set or 'none'}", flush=True)
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(**engine_args(small.model_copy(update={"model": model}))),
        stat_loggers=[counter.logger_factory()],
    )
    try:
        for glimpse in args.glimpses:
            print(await measure(engine, counter, glimpse, args.streams, args.warmup, args.seconds), flush=True)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32, help="requests at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per glimpse kind")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument(
        "--glimpses",
        type=lambda s: s.split(","),
        default=list(GLIMPSES),
        help="comma-separated glimpse kinds: " + ", ".join(GLIMPSES),
    )
    parser.add_argument("--models", type=Path, default=Path("models/bench"), help="where the model folders go")
    parser.add_argument(
        "--set",
        type=parse_override,
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field, e.g. pools.small.engine.cudagraph_mode=PIECEWISE",
    )
    args = parser.parse_args()
    if unknown := set(args.glimpses) - set(GLIMPSES):
        parser.error(f"unknown glimpse kinds {sorted(unknown)}")
    args.set = dict(args.set)
    try:
        args.small = small_pool(args.set)
    except ConfigError as exc:
        parser.error(str(exc))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
