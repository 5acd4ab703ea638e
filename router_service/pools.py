"""The loop's view of a pool deployment: Ray Serve handles made once, a retry when a replica dies."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from cluster import metrics
from deployments.protocol import Glimpse, NextGlimpse, Prompt, StepChunk, StepSampling

log = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, RayServeException)


class ServePoolClient:
    """Calls one pool. A call that fails because its replica died is sent again (once) to another one,
    unless part of its stream already reached the caller."""

    def __init__(self, handle: DeploymentHandle, role: str, retries: int = 1):
        self._glimpse = handle.options(method_name="glimpse")
        self._step = handle.options(method_name="step", stream=True)
        self._retries = retries
        self._role = role
        self.in_flight = 0  # this router replica's calls to the pool not yet answered (the tau controller's queue)

    async def glimpse(self, prompt: Prompt, top_k: int, affinity_key: str, priority: int = 0) -> Glimpse:
        """The step's first token and top-k log-probs, from the replica holding the request's prefix
        (``priority``: the engine's request priority, see ``ModelPool.glimpse``)."""
        self.in_flight += 1
        try:
            for _ in range(self._retries):
                try:
                    return await self._glimpse.remote(prompt, top_k, affinity_key=affinity_key, priority=priority)
                except RETRYABLE as exc:
                    self._retrying(exc)
            return await self._glimpse.remote(prompt, top_k, affinity_key=affinity_key, priority=priority)
        finally:
            self.in_flight -= 1

    async def step(
        self,
        prompt: Prompt,
        sampling: StepSampling,
        stream: bool,
        affinity_key: str,
        next_glimpse: NextGlimpse | None = None,
        glimpse_top_k: int | None = None,
        priority: int = 0,
    ) -> AsyncIterator[StepChunk]:
        """The step's chunks (see ``ModelPool.step``). Closing this generator early cancels the call, which
        aborts the engine request."""
        self.in_flight += 1
        try:
            for attempt in range(self._retries + 1):
                sent = False
                try:
                    call = self._step.remote(
                        prompt,
                        sampling,
                        stream,
                        affinity_key=affinity_key,
                        next_glimpse=next_glimpse,
                        glimpse_top_k=glimpse_top_k,
                        priority=priority,
                    )
                    async for chunk in call:
                        sent = sent or not chunk.done
                        yield chunk
                    return
                except RETRYABLE as exc:
                    if sent or attempt == self._retries:
                        raise
                    self._retrying(exc)
                except GeneratorExit:
                    call.cancel()
                    raise
        finally:
            self.in_flight -= 1

    def _retrying(self, exc: Exception) -> None:
        log.warning("%s pool call failed (%s); sending it to another replica", self._role, type(exc).__name__)
        metrics.inc("glimprouter_pool_retries", pool=self._role)
