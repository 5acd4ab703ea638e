"""The simulator's engine (cluster/ops/planner/engine.py) against iteration counts worked out by hand."""

from __future__ import annotations

import heapq

import pytest

from cluster.ops.planner.engine import Engine, EngineRequest


class Clock:
    """The part of the simulator an engine uses: the time and a queue of callbacks."""

    def __init__(self):
        self.now, self.events, self.n = 0.0, [], 0

    def at(self, when, fn, *args):
        self.n += 1
        heapq.heappush(self.events, (when, self.n, fn, args))

    def run(self):
        while self.events:
            self.now, _, fn, args = heapq.heappop(self.events)
            fn(*args)


def cost_10ms(decode, prefill, context):
    return 10.0


def test_one_request_takes_one_prefill_and_max_tokens_minus_one_decodes():
    clock, done = Clock(), []
    engine = Engine("large", cost_10ms, clock)
    engine.submit(EngineRequest("r", 100, 5, done.append))
    clock.run()
    assert done == [pytest.approx(0.05)]  # 1 mixed iteration writes the first token, 4 decode iterations the rest
    assert engine.iterations == {"mixed": 1, "decode": 4}
    assert engine.prefill_tokens == 100


def test_chunked_prefill_splits_a_long_prompt_over_the_budget():
    clock, done = Clock(), []
    engine = Engine("large", cost_10ms, clock, max_num_batched_tokens=64)
    engine.submit(EngineRequest("r", 200, 1, done.append))
    clock.run()
    assert engine.iterations["mixed"] == 4  # ceil(200 / 64)
    assert done == [pytest.approx(0.04)]


def test_prefix_cache_hits_whole_blocks_of_the_same_request_only():
    clock, done = Clock(), []
    engine = Engine("small", cost_10ms, clock)
    engine.submit(EngineRequest("a", 100, 10, done.append))
    clock.run()
    engine.submit(EngineRequest("a", 150, 1, done.append))  # the first 109 tokens are known: 96 in whole blocks
    engine.submit(EngineRequest("b", 150, 1, done.append))  # another request: nothing cached
    clock.run()
    assert engine.cached_tokens == 96
    assert engine.prefill_tokens == 100 + (150 - 96) + 150


def test_batching_costs_one_iteration_for_all_sequences():
    clock, done = Clock(), []
    engine = Engine("large", lambda d, p, c: 10.0 + 0.1 * d, clock)
    for i in range(8):
        engine.submit(EngineRequest(str(i), 10, 3, done.append))
    clock.run()
    # the first request starts an iteration alone; the other seven join the next one and finish together
    assert len(done) == 8 and sum(engine.iterations.values()) == 1 + 3
    assert max(done) < 8 * 3 * 0.010


def test_kv_capacity_holds_requests_back():
    clock, done = Clock(), []
    engine = Engine("large", cost_10ms, clock, kv_tokens=150)
    for i in range(3):
        engine.submit(EngineRequest(str(i), 90, 4, done.append))  # 94 tokens each: one at a time fits
    clock.run()
    assert done == pytest.approx([0.04, 0.08, 0.12])


def test_an_engine_sharing_its_gpu_slows_while_the_other_is_busy():
    clock, done = Clock(), []
    a = Engine("small", cost_10ms, clock, slowdown=2.0)
    b = Engine("large", cost_10ms, clock, slowdown=1.5)
    a.mates, b.mates = [b], [a]
    b.submit(EngineRequest("x", 10, 10, lambda t: None))
    a.submit(EngineRequest("y", 10, 2, done.append))
    clock.run()
    assert done == [pytest.approx(0.04)]  # two iterations at twice 10 ms
    assert b.busy_ms["decode"] + b.busy_ms["mixed"] == pytest.approx(10 + 1.5 * 10 * 2 + 10 * 7)
