"""The small-engine benchmark's counting and settings (the engine itself runs on a GPU machine)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from cluster.config import ConfigError
from loadtests.small_engine_bench import IterationCounter, Tally, figures, small_pool


def test_counter_splits_iterations_and_busy_time_by_phase():
    clock = iter([1.000, 1.003, 1.012, 1.016])
    counter = IterationCounter(now=lambda: next(clock))
    logger = counter.logger_factory()(None)
    for prefill, decode in ((0, 4), (50, 4), (0, 5), (0, 5)):  # ends at 1.000, 1.003 (3 ms), 1.012 (9), 1.016 (4)
        stats = SimpleNamespace(
            num_generation_tokens=decode, prompt_token_stats=SimpleNamespace(computed=prefill), finished_requests=[]
        )
        logger.record(SimpleNamespace(num_running_reqs=5, num_waiting_reqs=0), stats)
    tally = counter.tally()
    assert tally.iterations == Counter(decode=3, mixed=1) and tally.decode_tokens == 18
    assert tally.busy_s["mixed"] == pytest.approx(0.003) and tally.busy_s["decode"] == pytest.approx(0.013)


def test_figures_give_time_per_busy_iteration_of_each_phase():
    before = Tally(Counter(decode=100, mixed=10), Counter(decode=0.3, mixed=0.1), 2_000, 40)
    after = Tally(Counter(decode=400, mixed=110), Counter(decode=1.2, mixed=1.1), 14_000, 140)
    assert figures(before, after, 2.0) == {
        "iterations_per_s": 200.0,
        "ms_per_iteration": 5.0,
        "decode_tokens_per_iteration": 30.0,
        "new_requests_per_iteration": 0.25,
        "busy_fraction": 0.95,
        "mixed_fraction": 0.25,
        "ms_per_busy_iteration_by_phase": {"decode": 3.0, "mixed": 10.0},
    }


def test_overrides_set_the_small_engine_and_bad_ones_fail_with_the_field():
    assert small_pool({}).engine.cudagraph_mode == "FULL"  # the benchmark config's
    assert small_pool({"pools.small.engine.cudagraph_mode": "PIECEWISE"}).engine.cudagraph_mode == "PIECEWISE"
    with pytest.raises(ConfigError, match="cudagraph_mode"):
        small_pool({"pools.small.engine.cudagraph_mode": "SOMETIMES"})
