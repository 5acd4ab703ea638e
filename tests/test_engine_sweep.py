"""The engine sweep's driver and the trace summary, on a fake engine core (the real one runs on the GPU machine)."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from loadtests.engine_driver import Driver, Load
from loadtests.engine_sweep import BUSY, Sync, merge, parse_phases, sweep_pool
from loadtests.trace_summary import ITERATION, summarize, union_us


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeEngine:
    """A continuous-batching core: each step decodes every request whose prompt is done and prefills the rest within
    the token budget (a cached prefix counts as done); the step costs ``1 ms + 0.1 ms a sequence + 0.01 ms a prefill
    token`` on the fake clock."""

    def __init__(self, clock: FakeClock, capacity_tokens: int = 1_000_000, budget: int = 4096, block: int = 16):
        self.clock, self.capacity_tokens, self.budget, self.block = clock, capacity_tokens, budget, block
        self.requests: dict[str, dict] = {}
        self.cached: set[tuple[int, ...]] = set()
        self.batches, self.finished, self.added = [], set(), []
        self.next_id = 0

    def add(self, prompt, max_tokens, **sampling):
        rid = f"r{self.next_id}"
        self.next_id += 1
        hit = max((n for n in range(0, len(prompt) + 1, self.block) if tuple(prompt[:n]) in self.cached), default=0)
        self.requests[rid] = {"prompt": prompt, "done": hit, "out": 0, "max": max_tokens}
        self.added.append((len(prompt), max_tokens, sampling))
        return rid

    def abort(self, ids):
        for rid in ids:
            self.requests.pop(rid, None)

    def unfinished(self):
        return len(self.requests)

    def step(self):
        if not self.requests:
            return False
        budget, decode, prefill = self.budget, 0, 0
        for rid, r in list(self.requests.items()):
            left = len(r["prompt"]) - r["done"]
            if left <= 0:
                decode += 1
                budget -= 1
                r["out"] += 1
            elif budget > 0:
                chunk = min(left, budget)
                r["done"] += chunk
                budget -= chunk
                prefill += chunk
                if r["done"] == len(r["prompt"]):
                    for n in range(0, len(r["prompt"]) + 1, self.block):
                        self.cached.add(tuple(r["prompt"][:n]))
                    r["out"] += 1
            if r["out"] >= r["max"]:
                self.finished.add(rid)
                del self.requests[rid]
        self.batches.append((decode, prefill))
        self.clock.t += (1.0 + 0.1 * decode + 0.01 * prefill) / 1e3
        return True


def fake_driver(**kwargs) -> tuple[Driver, FakeEngine]:
    clock = FakeClock()
    engine = FakeEngine(clock, **kwargs)
    return Driver(engine, random.Random(1), clock=clock), engine


def test_sweep_rows_time_each_batch_shape():
    driver, _ = fake_driver()
    rows = driver.sweep([1, 8], [0, 256], [500], iterations=6)
    by_shape = {(r["decode_seqs"], r["prefill_tokens"]): r for r in rows}
    assert set(by_shape) == {(1, 0), (1, 256), (8, 0), (8, 256)}
    assert by_shape[(8, 0)]["iter_ms"] == pytest.approx(1.8)
    assert by_shape[(8, 0)]["measured_decode_seqs"] == 8 and by_shape[(8, 0)]["measured_prefill_tokens"] == 0
    # the arrival prefills only its fresh tokens (its prompt is cached), then decodes alongside for one iteration
    assert by_shape[(1, 256)]["measured_prefill_tokens"] == pytest.approx(256, abs=16)
    assert by_shape[(1, 256)]["iter_ms"] == pytest.approx(1.0 + 0.1 + 2.56, abs=0.2)
    assert all(r["context_tokens"] == 500 and r["context_tokens_mean"] > 500 for r in rows)


def test_sweep_leaves_out_what_the_kv_cache_cannot_hold():
    driver, engine = fake_driver(capacity_tokens=10_000)
    rows = driver.sweep([1, 8, 64], [0], [500, 4000], iterations=3)
    assert {(r["decode_seqs"], r["context_tokens"]) for r in rows} == {(1, 500), (8, 500), (1, 4000)}
    assert engine.unfinished() == 0  # each context's requests are aborted at its end


def test_steady_load_adds_an_arrival_every_few_iterations_with_its_sampling():
    driver, engine = fake_driver()
    figures = driver.steady(Load(4, 300, prefill=97, every=2, arrival={"temperature": 0.0, "logprobs": 20}), 20)
    arrivals = [a for a in engine.added if a[1] == 1]
    assert len(arrivals) == 6 + 11  # calls 0, 2, .. 10 of the warm-up's 11 and 0, 2, .. 20 of 21
    assert all(a == (397, 1, {"temperature": 0.0, "logprobs": 20}) for a in arrivals)
    assert figures["iterations"] == 20 and figures["measured_prefill_tokens"] == pytest.approx(97 / 2, abs=10)


def test_busy_load_replaces_ended_requests_until_told_to_stop():
    driver, engine = fake_driver()
    load = Load(6, 100)
    seen, started = [], []

    def stop() -> bool:
        seen.append(max((d for d, _ in engine.batches[-8:]), default=0))
        return engine.clock.t > 6.0  # about 3,800 iterations: every request ends once at least

    figures = driver.busy(load, stop, lambda: started.append(True))
    assert started == [True] and engine.unfinished() == 0
    assert len(engine.added) > 2 * load.seqs  # ended ones were replaced
    assert min(seen[5:]) >= load.seqs - 1 and figures["iter_ms"] == pytest.approx(1.6, abs=0.05)


def test_phases_parse_and_bad_ones_fail():
    assert parse_phases("small:sweep,large:profile+busy") == [("small", "sweep", False), ("large", "profile", True)]
    for bad in ("medium:sweep", "small:nap", "small"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_phases(bad)


def test_sync_marks_and_waits(tmp_path):
    sync = Sync(tmp_path / "s", poll_s=0.001)
    assert not sync.wait(["a"], timeout_s=0.01)
    sync.mark("a")
    assert sync.seen("a") and sync.wait(["a"], timeout_s=0.01)


def test_sweep_pool_takes_the_sweeps_engine_settings_and_overrides():
    small = sweep_pool("small", {})
    assert small.engine.cudagraph_mode == "FULL" and small.engine.max_num_batched_tokens == 4096
    large = sweep_pool("large", {"pools.large.engine.async_scheduling": False})
    assert large.engine.kv_cache_gib == 64 and large.engine.async_scheduling is False


def test_merge_writes_one_file_with_every_row(tmp_path):
    env = {"vllm": "0.26.0", "torch": "2.11.0", "gpu": "NVIDIA H200"}
    for role in ("small", "large"):
        (tmp_path / f"{role}.json").write_text(
            json.dumps(
                {
                    "role": role,
                    "model": role,
                    "engine": {},
                    "environment": env,
                    "rows": [
                        {
                            "model": role,
                            "shared": False,
                            "decode_seqs": 1,
                            "prefill_tokens": 0,
                            "context_tokens": 500,
                            "iter_ms": 1.0,
                        }
                    ],
                }
            )
        )
    out = tmp_path / "sweep.json"
    merge(
        argparse.Namespace(files=[tmp_path / "small.json", tmp_path / "large.json"], out=out, hardware="one H200 141GB")
    )
    data = json.loads(out.read_text())
    assert data["hardware"] == "one H200 141GB" and data["versions"]["vllm"] == "0.26.0"
    assert [r["model"] for r in data["rows"]] == ["small", "large"]
    assert all(r["mps"] is False and r["source"] == tmp_path.name for r in data["rows"])
    assert set(data["settings"]["busy_loads"]) == set(BUSY)


def test_union_counts_overlapping_intervals_once():
    assert union_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20


def test_trace_summary_splits_an_iteration_into_gpu_time_and_gaps():
    events = [{"ph": "X", "name": ITERATION, "cat": "user_annotation", "ts": t, "dur": 1000} for t in (0, 1000)]
    events += [
        {"ph": "X", "name": "gemm", "cat": "kernel", "ts": 100, "dur": 300},
        {"ph": "X", "name": "gemm", "cat": "kernel", "ts": 1100, "dur": 300},
        {"ph": "X", "name": "topk", "cat": "kernel", "ts": 300, "dur": 200},  # overlaps the first gemm by 100
        {"ph": "X", "name": "gpu_model_runner: sample", "cat": "user_annotation", "ts": 500, "dur": 400},
        {"ph": "X", "name": "cudaGraphLaunch", "cat": "cuda_runtime", "ts": 50, "dur": 20},
        {"ph": "X", "name": "late", "cat": "kernel", "ts": 5000, "dur": 100},  # outside the window
    ]
    s = summarize(events)
    assert s["iterations"] == 2 and s["wall_ms_per_iteration"] == 1.0
    assert s["gpu_busy_ms_per_iteration"] == pytest.approx(0.35) and s["gpu_busy_fraction"] == pytest.approx(0.35)
    assert s["top_kernels"][0] == {"name": "gemm", "ms": 0.3, "calls": 1.0}
    assert s["scopes"] == [{"name": "gpu_model_runner: sample", "ms": 0.2, "calls": 0.5}]
    assert s["cuda_api"][0]["name"] == "cudaGraphLaunch"


def test_engine_args_pass_async_scheduling_only_when_set():
    from deployments.pool import engine_args

    assert "async_scheduling" not in engine_args(sweep_pool("large", {}))  # vLLM's default
    assert engine_args(sweep_pool("small", {}))["async_scheduling"] is True  # the benchmark config's
    off = engine_args(sweep_pool("small", {"pools.small.engine.async_scheduling": False}))
    assert off["async_scheduling"] is False
