"""The router's pool client over a fake Ray Serve handle: retries before the first chunk, cancel on close."""

from __future__ import annotations

import pytest
from ray.exceptions import RayActorError

from cluster import metrics
from deployments.protocol import StepChunk, StepSampling
from router_service.pools import ServePoolClient


class FakeCall:
    """A streamed call's response: its chunks, or an error before the first one."""

    def __init__(self, chunks, error=None):
        self.chunks, self.error, self.cancelled = chunks, error, False

    def __aiter__(self):
        return self._items()

    async def _items(self):
        if self.error:
            raise self.error
        for chunk in self.chunks:
            yield chunk

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    def __init__(self, calls):
        self.calls, self.made = list(calls), []

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        self.made.append(kwargs)
        return self.calls.pop(0)


CHUNKS = [StepChunk("a"), StepChunk("ab", done=True)]
SAMPLING = StepSampling(max_tokens=4, temperature=0.0)


@pytest.fixture(autouse=True)
def no_ray_metrics(monkeypatch):
    monkeypatch.setattr(metrics, "inc", lambda *args, **kwargs: None)


async def test_closing_a_step_early_cancels_its_call():
    call = FakeCall(CHUNKS)
    client = ServePoolClient(FakeHandle([call]), "small")
    chunks = client.step([1, 2], SAMPLING, True, "req", glimpse_top_k=20)
    assert await anext(chunks) == CHUNKS[0] and client.in_flight == 1
    await chunks.aclose()
    assert call.cancelled and client.in_flight == 0


async def test_a_step_is_sent_again_only_before_its_first_chunk():
    handle = FakeHandle([FakeCall([], RayActorError()), FakeCall(CHUNKS)])
    client = ServePoolClient(handle, "small")
    assert [c async for c in client.step([1], SAMPLING, True, "req")] == CHUNKS
    assert len(handle.made) == 2 and handle.made[0]["glimpse_top_k"] is None
    finished = FakeCall(CHUNKS)
    assert [c async for c in ServePoolClient(FakeHandle([finished]), "small").step([1], SAMPLING, False, "r")] == CHUNKS
    assert not finished.cancelled  # a call read to its end is not cancelled
