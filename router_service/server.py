"""The Router deployment: OpenAI-compatible API over the step loop, state in Redis, tenants and limits."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from cluster import metrics
from cluster.config import ClusterConfig, PolicySettings, StepSettings
from cluster.redis_server import redis_url
from deployments.pool import resolve_tokenizer_dir
from router_service import responses
from router_service.api_models import ChatCompletionRequest, CompletionRequest, RoutingOverrides, openapi_body
from router_service.errors import APIError, install_error_handlers, validation_error
from router_service.loop import AnswerDelta, AnswerDone, LoopRequest, ReasoningDelta, StepDone, StepLoop
from router_service.policy import needs_glimpse
from router_service.pools import ServePoolClient
from router_service.prompts import PromptRenderer
from router_service.state import CANCELLED, FAILED, FINISHED, RequestNotFound, RequestStateStore, StateConflict, StepRecord
from router_service.tau_control import TauController
from router_service.tenancy import RateLimited, Tenant, TenantSettings, TenantStore, is_admin_key

log = logging.getLogger("ray.serve")
# No unauthenticated docs: every route but /health needs a key (the schema: `python -m cluster render openapi`)
app = FastAPI(title="GlimpRouter", description="Step-level collaborative inference, OpenAI-compatible.",
              docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(app)
# the policy fields a request may set for itself
POLICY_OVERRIDES = tuple(k for k in RoutingOverrides.model_fields if k in PolicySettings.model_fields)


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


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """Stateless router replica: every request's state lives in Redis."""

    def __init__(self, config: dict, small: DeploymentHandle, large: DeploymentHandle):
        self.cfg = ClusterConfig.model_validate(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.redis = aioredis.Redis.from_url(  # a connection dropped (Redis restarted) is redialled, not a 503
            redis_url(self.cfg.redis.url), socket_timeout=self.cfg.redis.socket_timeout_s,
            socket_connect_timeout=self.cfg.redis.socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2), retry_on_error=[RedisConnectionError])
        self.store = RequestStateStore(self.redis, ttl_s=self.cfg.redis.request_ttl_s, lease_s=self.cfg.router.lease_s)
        self.tenants = TenantStore(self.redis)
        self.admin = Tenant(name="admin", settings=TenantSettings(
            policy=self.cfg.router.policy, max_token_budget=self.cfg.router.steps.token_budget,
            requests_per_minute=1_000_000, max_concurrent_requests=100_000))
        renderers = {role: PromptRenderer(resolve_tokenizer_dir(pool), pool.model.chat_template)
                     for role, pool in self.cfg.pools.items()}
        self.renderers = renderers
        self.pools = {"small": ServePoolClient(small, "small"), "large": ServePoolClient(large, "large")}
        control = self.cfg.router.tau_controller
        self.tau_controller = TauController(control) if control.enabled else None
        self._tau_task: asyncio.Task | None = None
        self.loop = StepLoop(self.pools, renderers, self.tau_controller)
        self.large_fraction = metrics.LargeFraction()

    # ---- endpoints -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        """Liveness: no key needed."""
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """The routed model, as OpenAI's model list."""
        await self._tenant(request)
        return {"object": "list", "data": [{"id": self.cfg.name, "object": "model", "owned_by": "glimprouter",
                                            "pools": {r: p.model.name for r, p in self.cfg.pools.items()}}]}

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        """Chat completion through the step loop."""
        return await self._complete(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request):
        """Text completion: the prompt is one user message."""
        return await self._complete(request, CompletionRequest, chat=False)

    @app.get("/v1/requests/{request_id}")
    async def get_request(self, request_id: str, request: Request) -> dict:
        """The whole trace of one of the caller's requests (404 for anyone else's)."""
        tenant = await self._tenant(request)
        state = await self._redis(self.store.get(tenant.name, request_id))
        return state.trace()

    @app.get("/v1/requests")
    async def list_requests(self, request: Request) -> dict:
        """Ids of the caller's own requests (another tenant's never appear)."""
        tenant = await self._tenant(request)
        return {"object": "list", "data": await self._redis(self.store.list_ids(tenant.name))}

    @app.get("/v1/admin/tenants/{name}/usage")
    async def tenant_usage(self, name: str, request: Request, day: str | None = None) -> dict:
        """A tenant's usage per pool for one UTC day (admin key only)."""
        if not is_admin_key(bearer_key(request)):
            raise APIError(403, "this endpoint needs the admin key", code="admin_only")
        if await self._redis(self.tenants.get_tenant(name)) is None:
            raise APIError(404, f"tenant {name!r} not found", code="tenant_not_found")
        try:
            return await self._redis(self.tenants.usage(name, day))
        except ValueError:
            raise APIError(400, f"day must be YYYY-MM-DD, not {day!r}", param="day") from None

    @app.post("/v1/requests/{request_id}/resume")
    async def resume(self, request_id: str, request: Request):
        """Continue a running request whose router replica died, from its last complete step.
        ``?stream=true`` streams the rest (the steps kept come first as one reasoning chunk)."""
        tenant = await self._tenant(request)
        await self._redis(self.store.claim(tenant.name, request_id, self.replica))
        state = await self._redis(self.store.get(tenant.name, request_id))
        stored = state.request
        loop_req = LoopRequest(
            request_id=request_id, messages=stored["messages"], policy=PolicySettings(**stored["policy"]),
            steps=StepSettings(**stored["steps"]), temperature=stored["temperature"], top_p=stored["top_p"],
            seed=stored["seed"], stream=request.query_params.get("stream", "false").lower() == "true",
            tau_bounds=self._tau_bounds(tenant))
        admission = await self._admit(tenant, request_id)
        return await self._respond(tenant, loop_req, stored, state.steps, admission)

    # ---- the request path ------------------------------------------------------------------------------

    async def _complete(self, request: Request, model_cls, chat: bool):
        tenant = await self._tenant(request)
        data = await read_json(request, self.cfg.router.max_body_bytes)
        try:
            body = model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.model != self.cfg.name or not tenant.settings.allows_model(body.model):
            raise APIError(404, f"model {body.model!r} does not exist or you have no access to it", param="model",
                           code="model_not_found")
        policy, steps = self._settings(tenant, body)
        messages = body.chat()
        prompt_tokens = self._check_context(messages, steps)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stored = {
            "endpoint": "chat" if chat else "completions", "model": body.model, "messages": messages,
            "policy": policy.model_dump(), "steps": steps.model_dump(), "temperature": self._temperature(body),
            "top_p": body.top_p if body.top_p is not None else steps.top_p, "seed": body.seed, "stream": body.stream,
            "include_usage": bool(body.stream_options and body.stream_options.include_usage),
            "prompt_tokens": prompt_tokens,
        }
        admission = await self._admit(tenant, request_id)
        try:
            await self._redis(self.store.create(tenant.name, request_id, stored, self.replica))
        except BaseException:
            await self.tenants.release(tenant, request_id)
            raise
        loop_req = LoopRequest(request_id, messages, policy, steps, stored["temperature"], stored["top_p"],
                               body.seed, body.stream, self._tau_bounds(tenant))
        return await self._respond(tenant, loop_req, stored, [], admission)

    @staticmethod
    def _tau_bounds(tenant: Tenant) -> tuple[float | None, float | None]:
        """The tenant's floor and ceiling of tau (for the load-aware controller)."""
        return tenant.settings.tau_floor, tenant.settings.tau_ceiling

    async def _control_tau(self) -> None:
        """Sample the large pool's in-flight calls every interval and let the controller move tau."""
        while True:
            await asyncio.sleep(self.tau_controller.settings.interval_s)
            direction = self.tau_controller.update(self.pools["large"].in_flight)
            if direction:
                metrics.inc("glimprouter_tau_changes", direction=direction)
            metrics.set_gauge("glimprouter_tau_offset_nats", self.tau_controller.offset)

    def _temperature(self, body) -> float:
        return body.temperature if body.temperature is not None else self.cfg.router.steps.temperature

    def _settings(self, tenant: Tenant, body) -> tuple[PolicySettings, StepSettings]:
        """The request's policy and step limits: router defaults < tenant defaults < request fields."""
        overrides = {k: v for k in POLICY_OVERRIDES if (v := getattr(body, k)) is not None}
        try:  # each field is valid alone (the body's model); together they may not be
            policy = PolicySettings.model_validate({**tenant.settings.policy.model_dump(), **overrides})
        except ValidationError as exc:
            raise validation_error(exc, status=400) from None
        base = self.cfg.router.steps
        budget = body.token_budget or min(base.token_budget, tenant.settings.max_token_budget)
        if budget > tenant.settings.max_token_budget:
            raise APIError(400, f"token_budget {budget} exceeds this key's limit of {tenant.settings.max_token_budget}",
                           param="token_budget", code="budget_too_large")
        steps = base.model_copy(update={
            "token_budget": budget,
            "step_max_tokens": body.step_max_tokens or base.step_max_tokens,
            "final_max_tokens": body.final_max_tokens() or base.final_max_tokens,
        })
        return policy, steps

    def _check_context(self, messages: list[dict], steps: StepSettings) -> int:
        """400 if the prompt, a full budget of steps and the answer cannot fit a pool's context."""
        prompt_tokens = 0
        for role, pool in self.cfg.pools.items():
            try:
                n = len(self.renderers[role].step_prompt(messages, [], steps.delimiter))
            except Exception as exc:  # a template that cannot render these messages
                raise APIError(400, f"messages cannot be rendered by the {role} model's chat template: {exc}",
                               param="messages") from None
            need = n + steps.token_budget + steps.final_max_tokens + 16
            if need > pool.engine.max_model_len:
                raise APIError(400, f"prompt ({n} tokens) plus token_budget and max_tokens exceed the {role} model's "
                               f"context of {pool.engine.max_model_len} tokens", param="messages",
                               code="context_length_exceeded")
            prompt_tokens = n
        return prompt_tokens

    async def _tenant(self, request: Request) -> Tenant:
        key = bearer_key(request)
        if is_admin_key(key):
            return self.admin
        tenant = await self._redis(self.tenants.authenticate(key))
        if tenant is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return tenant

    async def _admit(self, tenant: Tenant, request_id: str):
        try:
            return await self._redis(self.tenants.admit(tenant, request_id))
        except RateLimited as exc:
            raise APIError(429, str(exc), code="rate_limit_exceeded", headers=exc.headers()) from None

    async def _redis(self, awaitable):
        """Await a Redis-backed call: outages become 503, missing requests 404, lease conflicts 409."""
        try:
            return await awaitable
        except RequestNotFound as exc:
            raise APIError(404, f"request {exc.args[0]} not found", code="request_not_found") from None
        except StateConflict as exc:
            raise APIError(409, str(exc), code="conflict") from None
        except (RedisError, OSError) as exc:
            raise APIError(503, f"state store unavailable ({type(exc).__name__}); retry later",
                           code="redis_unavailable", headers={"Retry-After": "1"}) from None

    async def _drive(self, tenant: Tenant, req: LoopRequest, done: list[StepRecord]) -> AsyncIterator:
        """The loop's events, with every complete step appended to Redis before the next begins and the
        request's end (finished, failed, cancelled) recorded; the admission is released at the end."""
        rid, name = req.request_id, tenant.name
        start, outcome = time.perf_counter(), FAILED
        try:
            async for event in self.loop.run(req, done):
                if isinstance(event, StepDone):  # Redis calls of a step run concurrently: one round trip
                    with metrics.timed("glimprouter_redis_latency_seconds", op="append_step"):
                        await self._redis(asyncio.gather(
                            self.store.append_step(name, rid, self.replica, event.record, event.glimpsed),
                            self.tenants.charge_tokens(tenant, event.record.pool, event.record.output_tokens),
                            self.tenants.heartbeat(tenant, rid)))
                    self._record_step(name, event)
                elif isinstance(event, AnswerDone):
                    with metrics.timed("glimprouter_redis_latency_seconds", op="finish"):
                        await self._redis(asyncio.gather(
                            self.tenants.charge_tokens(tenant, event.pool, event.output_tokens),
                            self.store.finish(name, rid, self.replica, {
                                "text": event.text, "pool": event.pool, "output_tokens": event.output_tokens,
                                "prompt_tokens": event.prompt_tokens, "finish_reason": event.finish_reason,
                                "ms": event.ms})))
                    metrics.inc("glimprouter_tokens", event.output_tokens, tenant=name, pool=event.pool)
                    outcome = FINISHED
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            outcome = CANCELLED
            await self._end_quietly(name, rid, CANCELLED, "client disconnected")
            raise
        except RayError as exc:
            await self._end_quietly(name, rid, FAILED, f"pool unavailable: {type(exc).__name__}")
            raise APIError(503, "a model pool is unavailable; retry, or resume the request", code="pool_unavailable",
                           headers={"Retry-After": "2"}) from None
        except APIError as exc:
            if exc.status != 409:
                await self._end_quietly(name, rid, FAILED, exc.message)
            raise
        finally:
            metrics.inc("glimprouter_requests", tenant=name, policy=req.policy.policy, outcome=outcome)
            metrics.observe("glimprouter_request_latency_seconds", time.perf_counter() - start, policy=req.policy.policy)
            await asyncio.shield(self._release(tenant, rid))

    def _record_step(self, tenant: str, event: StepDone) -> None:
        """Metrics of one complete step."""
        step = event.record
        metrics.inc("glimprouter_steps", tenant=tenant, pool=step.pool)
        metrics.inc("glimprouter_tokens", step.output_tokens, tenant=tenant, pool=step.pool)
        metrics.observe("glimprouter_step_latency_seconds", step.step_ms / 1e3, pool=step.pool)
        if event.glimpsed:
            metrics.inc("glimprouter_glimpses", tenant=tenant)
            metrics.observe("glimprouter_glimpse_latency_seconds", step.glimpse_ms / 1e3)
        if step.entropy is not None:
            metrics.observe("glimprouter_first_token_entropy_nats", step.entropy)
        self.large_fraction.record(step.pool)

    async def _end_quietly(self, tenant: str, rid: str, status: str, why: str) -> None:
        try:
            await asyncio.shield(self.store.fail(tenant, rid, self.replica, status, why))
        except (StateConflict, RedisError, OSError):
            log.warning("request %s: could not record status %s", rid, status)

    async def _release(self, tenant: Tenant, rid: str) -> None:
        try:
            await self.tenants.release(tenant, rid)
        except (RedisError, OSError):
            log.warning("request %s: could not release its admission", rid)

    async def _usage(self, tenant: Tenant, req: LoopRequest, stored: dict, steps: list[StepRecord],
                     answer: AnswerDone) -> dict:
        """The response's usage, recorded for the tenant. glimprouter glimpses before every step."""
        glimpses = len(steps) if needs_glimpse(req.policy) else 0
        usage = responses.usage(steps, answer, stored["prompt_tokens"], glimpses)
        for pool, counts in usage["per_pool"].items():
            await self._redis(self.tenants.record_usage(
                tenant, pool, requests=int(pool == answer.pool),
                prompt_tokens=usage["prompt_tokens"] if pool == answer.pool else 0,
                output_tokens=counts["completion_tokens"], steps=counts["steps"], glimpses=counts.get("glimpses", 0)))
        return usage

    async def _respond(self, tenant: Tenant, req: LoopRequest, stored: dict, done: list[StepRecord], admission):
        if self.tau_controller is not None and self._tau_task is None:  # started in the replica's event loop
            self._tau_task = asyncio.create_task(self._control_tau())
        events = self._drive(tenant, req, done)
        headers = admission.headers()
        chat = stored["endpoint"] == "chat"
        if not req.stream:
            steps, answer = list(done), None
            async for event in events:
                if isinstance(event, StepDone):
                    steps.append(event.record)
                elif isinstance(event, AnswerDone):
                    answer = event
            usage = await self._usage(tenant, req, stored, steps, answer)
            build = responses.chat_completion if chat else responses.text_completion
            body = build(req.request_id, stored["model"], responses.reasoning_text(steps, req.steps.delimiter), answer,
                         usage, responses.routing_summary(stored["policy"], steps))
            return JSONResponse(body, headers={**headers, "x-request-id": req.request_id})
        first = await anext(events)  # errors before the first event keep their real status
        return StreamingResponse(self._sse(tenant, req, stored, done, first, events), media_type="text/event-stream",
                                 headers={**headers, "x-request-id": req.request_id})

    async def _sse(self, tenant, req: LoopRequest, stored: dict, done: list[StepRecord], first, events) -> AsyncIterator[str]:
        """Yields SSE lines: role, reasoning deltas (steps joined by the delimiter), answer deltas, finish,
        usage (if asked), ``[DONE]``; an error after the start is sent as an error object."""
        writer = responses.ChunkWriter(req.request_id, stored["model"], stored["endpoint"] == "chat")
        steps = list(done)
        if writer.chat:
            yield writer.delta(role="assistant", content="")
        if done:
            yield writer.delta(reasoning=responses.reasoning_text(done, req.steps.delimiter))
        at_step_start = bool(done)

        async def all_events():
            yield first
            async for e in events:
                yield e

        try:
            async for event in all_events():
                if isinstance(event, ReasoningDelta):
                    if at_step_start:
                        yield writer.delta(reasoning=req.steps.delimiter)
                        at_step_start = False
                    yield writer.delta(reasoning=event.text)
                elif isinstance(event, StepDone):
                    steps.append(event.record)
                    at_step_start = True
                elif isinstance(event, AnswerDelta):
                    yield writer.delta(content=event.text)
                elif isinstance(event, AnswerDone):
                    usage = await self._usage(tenant, req, stored, steps, event)
                    yield writer.finish(event.finish_reason or "stop", responses.routing_summary(stored["policy"], steps))
                    if stored.get("include_usage"):
                        yield writer.usage(usage)
        except APIError as exc:
            yield writer.error(exc.body())
        yield writer.done()
