"""Tokens per second of each pool on the running local cluster, through Ray Serve handles.

    python -m loadtests.pool_bench [--tokens 64] [--batch 8]

Prints one line per pool: single-stream tokens/s (greedy, fixed length) and aggregate tokens/s of a batch
of concurrent requests, plus a glimpse's latency. Numbers are recorded in docs/local-cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from cluster.topology import DEPLOYMENT_NAMES
from deployments.protocol import StepSampling

PROMPT = "<|im_start|>user\nTell me a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


async def one(handle, tokens: int, seed: int) -> int:
    sampling = StepSampling(max_tokens=tokens, temperature=0.0, ignore_eos=True, seed=seed)
    chunks = [c async for c in handle.options(method_name="step", stream=True).remote(f"{PROMPT}{seed}", sampling)]
    return chunks[-1].output_tokens


async def bench(app: str, tokens: int, batch: int) -> None:
    from ray import serve

    for role, name in DEPLOYMENT_NAMES.items():
        handle = serve.get_deployment_handle(name, app_name=app)
        await one(handle, 4, 0)  # warm-up
        t0 = time.perf_counter()
        n = await one(handle, tokens, 1)
        single = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        total = sum(await asyncio.gather(*(one(handle, tokens, 100 + i) for i in range(batch))))
        aggregate = total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(5):
            await handle.glimpse.remote(PROMPT, 20)
        glimpse_ms = (time.perf_counter() - t0) / 5 * 1e3
        print(
            f"{role:5s} ({name}): single stream {single:6.1f} tok/s | batch of {batch}: {aggregate:6.1f} tok/s "
            f"| glimpse {glimpse_ms:5.1f} ms",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="glimprouter")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    asyncio.run(bench(args.app, args.tokens, args.batch))


if __name__ == "__main__":
    main()
