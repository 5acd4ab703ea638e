"""The benchmark's client: prompts, the client arms (request fields), one request through the HTTP API
timed (wall time, time to first token), and the warm-up."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from cluster.config import ClusterConfig

METRICS_LAG_S = 12  # Ray exports metrics every few seconds


def prompt_text(seed: int, tokens: int = 200) -> str:
    """A user message of exactly ``tokens`` words of the benchmark tokenizer (one token each)."""
    rnd = random.Random(seed)
    return " ".join(f"w{rnd.randrange(1000, 150000)}" for _ in range(tokens))


STREAMED = {"stream": True, "stream_options": {"include_usage": True}}


ARMS = {  # request fields of each client arm
    "stream": STREAMED,
    "final": {"stream": False},
    "fused": {**STREAMED, "fused_glimpse": True},
    "instep": {**STREAMED, "glimpse_in_step": True},
    "random": {**STREAMED, "policy": "random"},  # 25%, at random steps
    "large": {**STREAMED, "policy": "large_only"},
}


async def one_request(client: httpx.AsyncClient, model: str, seed: int, fields: dict) -> dict:
    """One chat completion with ``fields`` (an arm's, plus any policy): wall time, time to first token (streamed
    only), usage and routing."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt_text(seed)}], **fields}
    t0 = time.perf_counter()
    if not body.get("stream"):
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        data = response.json()
        return {
            "id": data["id"],
            "seconds": time.perf_counter() - t0,
            "ttft": None,
            "usage": data["usage"],
            "routing": data["routing"],
        }
    ttft, usage, routing, rid = None, None, None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk.get("id", rid)
            delta = (chunk.get("choices") or [{}])[0].get("delta", {})
            if ttft is None and (delta.get("content") or delta.get("reasoning_content")):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
            routing = chunk.get("routing") or routing
    return {"id": rid, "seconds": time.perf_counter() - t0, "ttft": ttft, "usage": usage, "routing": routing}


async def warm_up(
    client: httpx.AsyncClient, cfg: ClusterConfig, concurrency: int = 1, lag_s: float = METRICS_LAG_S
) -> None:
    """``concurrency`` requests at once, then ``lag_s`` for their metrics to be exported (so that they are not
    counted in the first level). At the load's largest concurrency this runs the engines' kernels at the levels'
    batch shapes before any level is measured: in each start of the sixth GPU run whose engines had just
    compiled, the first level had a time-to-first-token tail of 3-10 s that later levels did not have."""
    await asyncio.gather(*(one_request(client, cfg.name, 999 + i, ARMS["stream"]) for i in range(concurrency)))
    await asyncio.sleep(lag_s)
