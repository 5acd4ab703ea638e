"""The HTTP layer: the OpenAI-compatible routes and the ``Router`` deployment (the ingress).

Routes only translate HTTP: the body and the key go into ``RequestService`` (``router_service/service.py``),
its events come back as a JSON response or an SSE stream, its errors as OpenAI error objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from cluster import metrics
from cluster.config import ClusterConfig
from cluster.topology import ROUTER_DEPLOYMENT, tokenizer_dir
from router_service import responses
from router_service.api_models import ChatCompletionRequest, CompletionRequest, openapi_body
from router_service.errors import APIError, install_error_handlers, validation_error
from router_service.headers import ratelimit_headers, refusal_headers
from router_service.loop import AnswerDelta, ReasoningDelta, StepDone
from router_service.pools import ServePoolClient
from router_service.prompts import PromptRenderer
from router_service.service import BASE_ID, Finished, RequestService, Run
from router_service.tenancy import RateLimited, is_admin_key

# No unauthenticated docs: every route but /health needs a key (the schema: `python -m cluster render openapi`)
app = FastAPI(
    title="GlimpRouter",
    description="Step-level collaborative inference, OpenAI-compatible.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
install_error_handlers(app)


@app.exception_handler(RateLimited)
async def _rate_limited(_: Request, exc: RateLimited):
    metrics.inc("glimprouter_rejections", tenant=exc.tenant, reason=exc.reason)
    return APIError(429, str(exc), code="rate_limit_exceeded", headers=refusal_headers(exc)).response()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object: 413 past ``max_bytes``, 400 if it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")
    try:
        data = json.loads(bytes(body), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def bearer_key(request: Request) -> str:
    """The API key of ``Authorization: Bearer KEY``; 401 without one."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return key.strip()


def http_request_id(request: Request) -> str | None:
    """The HTTP request's id: the client's ``x-request-id``, else the one Serve's proxy gave it (the proxy returns
    it in the response's ``x-request-id``); 400 for an id that cannot name a request."""
    value = request.headers.get("x-request-id")
    if value is not None and not BASE_ID.match(value):
        raise APIError(
            400, f"x-request-id must match {BASE_ID.pattern}", param="x-request-id", code="invalid_request_id"
        )
    return value


def redis_client(cfg: ClusterConfig) -> aioredis.Redis:
    """The replica's Redis client: a connection dropped (Redis restarted) is redialled, not a 503."""
    return aioredis.Redis.from_url(
        cfg.redis.effective_url(),
        socket_timeout=cfg.redis.socket_timeout_s,
        socket_connect_timeout=cfg.redis.socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError],
    )


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(app)
class Router:
    """Stateless router replica: every request's state lives in Redis."""

    def __init__(self, config: dict, small: DeploymentHandle, large: DeploymentHandle):
        self.cfg = ClusterConfig.model_validate(config)
        renderers = {
            role: PromptRenderer(tokenizer_dir(pool), pool.model.chat_template) for role, pool in self.cfg.pools.items()
        }
        pools = {"small": ServePoolClient(small, "small"), "large": ServePoolClient(large, "large")}
        replica = serve.get_replica_context().replica_id.unique_id
        self.service = RequestService(self.cfg, redis_client(self.cfg), pools, renderers, replica)
        self.created = int(time.time())

    @app.get("/health")
    async def health(self) -> dict:
        """Liveness: no key needed."""
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """The routed model, as OpenAI's model list."""
        await self.service.authenticate(bearer_key(request))
        return {"object": "list", "data": [self._model()]}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict:
        """One model, as OpenAI's model object (404 for a model not served)."""
        await self.service.authenticate(bearer_key(request))
        if model_id != self.cfg.name:
            raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return self._model()

    def _model(self) -> dict:
        return {
            "id": self.cfg.name,
            "object": "model",
            "created": self.created,
            "owned_by": "glimprouter",
            "pools": {r: p.model.name for r, p in self.cfg.pools.items()},
        }

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        """Chat completion through the step loop."""
        return await self._complete(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request):
        """Text completion: the prompt is one user message."""
        return await self._complete(request, CompletionRequest, "completions")

    @app.get("/v1/requests/{request_id}")
    async def get_request(self, request_id: str, request: Request) -> dict:
        """The whole trace of one of the caller's requests (404 for anyone else's)."""
        return await self.service.trace(await self.service.authenticate(bearer_key(request)), request_id)

    @app.get("/v1/requests")
    async def list_requests(self, request: Request, limit: int = 20) -> dict:
        """Ids of the caller's own requests, newest first (another tenant's never appear; the admin key lists
        every tenant's, as ``tenant/id``)."""
        tenant = await self.service.authenticate(bearer_key(request))
        ids, more = await self.service.request_ids(tenant, limit)
        return {
            "object": "list",
            "data": ids,
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
            "has_more": more,
        }

    @app.get("/v1/admin/tenants/{name}/usage")
    async def tenant_usage(self, name: str, request: Request, day: str | None = None) -> dict:
        """A tenant's usage per pool for one UTC day (admin key only)."""
        if not is_admin_key(bearer_key(request)):
            raise APIError(403, "this endpoint needs the admin key", code="admin_only")
        return await self.service.tenant_usage(name, day)

    @app.post("/v1/requests/{request_id}/resume")
    async def resume(self, request_id: str, request: Request):
        """Continue a running request whose router replica died, from its last complete step.
        ``?stream=true`` streams the rest (the steps kept come first as one reasoning chunk)."""
        tenant = await self.service.authenticate(bearer_key(request))
        stream = request.query_params.get("stream", "false").lower() == "true"
        return await self._respond(await self.service.resume(tenant, request_id, stream))

    async def _complete(self, request: Request, model_cls, endpoint: str):
        tenant = await self.service.authenticate(bearer_key(request))
        data = await read_json(request, self.cfg.router.max_body_bytes)
        try:
            body = model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        return await self._respond(await self.service.start(tenant, body, endpoint, http_request_id(request)))

    async def _respond(self, run: Run):
        """The run as one JSON response, or as an SSE stream whose status is that of its first event."""
        self.service.start_background()
        events = self.service.events(run)
        headers = ratelimit_headers(run.admission.state)  # Serve's proxy adds the one x-request-id
        if not run.loop.stream:
            finished = None
            async for event in events:
                if isinstance(event, Finished):
                    finished = event
            return JSONResponse(self._body(run, finished), headers=headers)
        first = await anext(events)  # errors before the first event keep their real status
        return StreamingResponse(self._sse(run, first, events), media_type="text/event-stream", headers=headers)

    @staticmethod
    def _body(run: Run, finished: Finished) -> dict:
        build = responses.chat_completion if run.stored.endpoint == "chat" else responses.text_completion
        return build(
            run.loop.request_id,
            run.stored.model,
            responses.reasoning_text(finished.steps, run.stored.steps.delimiter),
            finished.answer,
            finished.usage,
            responses.routing_summary(run.stored.policy, finished.steps),
        )

    @staticmethod
    async def _sse(run: Run, first, events) -> AsyncIterator[str]:
        """Yields SSE lines: role, reasoning deltas (steps joined by the delimiter), answer deltas, finish,
        usage (if asked), ``[DONE]``; an error after the start is sent as an error object."""
        delimiter = run.stored.steps.delimiter
        writer = responses.ChunkWriter(run.loop.request_id, run.stored.model, run.stored.endpoint == "chat")
        if writer.chat:
            yield writer.delta(role="assistant", content="")
        if run.done:
            yield writer.delta(reasoning=responses.reasoning_text(run.done, delimiter))
        at_step_start = bool(run.done)

        async def all_events():
            yield first
            async for e in events:
                yield e

        try:
            async for event in all_events():
                if isinstance(event, ReasoningDelta):
                    if at_step_start:
                        yield writer.delta(reasoning=delimiter)
                        at_step_start = False
                    yield writer.delta(reasoning=event.text)
                elif isinstance(event, StepDone):
                    at_step_start = True
                elif isinstance(event, AnswerDelta):
                    yield writer.delta(content=event.text)
                elif isinstance(event, Finished):
                    routing = responses.routing_summary(run.stored.policy, event.steps)
                    yield writer.finish(event.answer.finish_reason or "stop", routing)
                    if run.stored.include_usage:
                        yield writer.usage(event.usage)
        except APIError as exc:
            yield writer.error(exc.body())
        yield writer.done()
