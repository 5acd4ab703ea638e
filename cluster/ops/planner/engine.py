"""One vLLM replica as the simulator sees it: an iteration-level continuous-batching engine.

Each iteration decodes one token for every running sequence, then spends what is left of the chunked-prefill
budget (``max_num_batched_tokens``) on the prompts waiting, in arrival order, while the batch has room
(``max_num_seqs``) and the KV cache holds the request (prompt plus its output). A prompt's tokens in the
prefix cache (the request's earlier calls to this engine, in whole 16-token blocks) are not computed; the
iteration that finishes a prompt samples its first token (a glimpse ends there). The iteration's time comes
from the engine's cost profile (``cluster/ops/planner/profiles.py``), times the sharing factor while another engine
on the same GPU is in an iteration.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

BLOCK = 16  # vLLM's KV block: the prefix cache hits whole blocks


@dataclass(eq=False)
class EngineRequest:
    """One call's work on an engine: a prompt, the tokens to write, and what to do when the last is out."""

    key: str  # the router request it belongs to (the prefix cache's unit)
    prompt_tokens: int
    max_tokens: int
    done: Callable[[float], None]
    to_prefill: int = 0
    cached: int = 0
    submitted_at: float = 0.0


@dataclass(eq=False)
class Engine:
    """A replica's engine. ``cost(decode_seqs, prefill_tokens, context_tokens) -> ms`` alone on its GPU."""

    role: str
    cost: Callable[[float, float, float], float]
    sim: object  # the Simulator: .now, .at(t, fn, *args)
    slowdown: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_tokens: int = 10**9
    mates: list = field(default_factory=list)  # the other engines on this GPU
    waiting: deque = field(default_factory=deque)
    prefilling: list = field(default_factory=list)  # admitted, prompt partly computed
    running: list = field(default_factory=list)  # heap of (finish iteration, n, request)
    known: dict = field(default_factory=dict)  # request key -> tokens of it the prefix cache holds
    busy: bool = False
    iteration: int = 0
    context: int = 0  # context tokens of the running sequences
    kv_used: int = 0
    n: int = 0
    # counters, as the pools export them
    iterations: dict = field(default_factory=lambda: {"decode": 0, "mixed": 0})
    busy_ms: dict = field(default_factory=lambda: {"decode": 0.0, "mixed": 0.0})
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def submit(self, req: EngineRequest) -> None:
        hit = (min(self.known.get(req.key, 0), req.prompt_tokens - 1) // BLOCK) * BLOCK
        req.cached, req.to_prefill, req.submitted_at = hit, req.prompt_tokens - hit, self.sim.now
        self.prompt_tokens += req.prompt_tokens
        self.cached_tokens += hit
        self.waiting.append(req)
        if not self.busy:
            self._start()

    def forget(self, key: str) -> None:
        """The request ended: its prefix may be evicted (kept here only while the request lives)."""
        self.known.pop(key, None)

    def _start(self) -> None:
        decode = len(self.running)
        budget = self.max_num_batched_tokens - decode
        batch: list[tuple[EngineRequest, int]] = []
        for req in self.prefilling:  # partly computed prompts first, as vLLM's running queue
            if budget <= 0:
                break
            chunk = min(req.to_prefill, budget)
            batch.append((req, chunk))
            budget -= chunk
        while self.waiting and budget > 0 and decode + len(self.prefilling) < self.max_num_seqs:
            req = self.waiting[0]
            need = req.prompt_tokens + req.max_tokens
            if self.kv_used + need > self.kv_tokens and (self.running or self.prefilling):
                break
            self.waiting.popleft()
            self.kv_used += need
            self.prefilling.append(req)
            chunk = min(req.to_prefill, budget)
            batch.append((req, chunk))
            budget -= chunk
        prefill = sum(chunk for _, chunk in batch)
        if not decode and not batch:
            self.busy = False
            return
        ms = self.cost(decode, prefill, self.context)
        if self.slowdown != 1.0 and any(m.busy for m in self.mates):
            ms *= self.slowdown
        self.busy = True
        self.sim.at(self.sim.now + ms / 1e3, self._end, batch, decode, ms)

    def _end(self, batch: list[tuple[EngineRequest, int]], decode: int, ms: float) -> None:
        now = self.sim.now
        self.iteration += 1
        phase = "mixed" if batch else "decode"
        self.iterations[phase] += 1
        self.busy_ms[phase] += ms
        self.decode_tokens += decode
        self.context += decode
        while self.running and self.running[0][0] <= self.iteration:
            _, _, req = heapq.heappop(self.running)
            self._finish(req, now)
        for req, chunk in batch:
            req.to_prefill -= chunk
            self.prefill_tokens += chunk
            if req.to_prefill > 0:
                continue
            self.prefilling.remove(req)
            if req.max_tokens <= 1:
                self.context += req.prompt_tokens + 1
                self._finish(req, now)
            else:
                self.n += 1
                self.context += req.prompt_tokens + 1
                heapq.heappush(self.running, (self.iteration + req.max_tokens - 1, self.n, req))
        self._start()

    def _finish(self, req: EngineRequest, now: float) -> None:
        self.context -= req.prompt_tokens + req.max_tokens
        self.kv_used -= req.prompt_tokens + req.max_tokens
        self.known[req.key] = max(self.known.get(req.key, 0), req.prompt_tokens + req.max_tokens - 1)
        req.done(now)

    def summary(self, wall_s: float) -> dict:
        """Counters over ``wall_s``, in the result files' terms."""
        iterations = sum(self.iterations.values())
        busy = sum(self.busy_ms.values())
        return {
            "iterations": iterations,
            "busy_s": busy / 1e3,
            "busy_fraction": busy / 1e3 / wall_s if wall_s else 0.0,
            "ms_per_busy_iteration": busy / iterations if iterations else 0.0,
            "decode_tokens_per_iteration": self.decode_tokens / iterations if iterations else 0.0,
            "ms_by_phase": {p: self.busy_ms[p] / n for p, n in self.iterations.items() if n},
            "mixed_fraction": self.iterations["mixed"] / iterations if iterations else 0.0,
            "prefill_tokens": self.prefill_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }
