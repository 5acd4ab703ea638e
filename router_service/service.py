"""One request from admission to finish: authenticate, settle its settings, admit, store, drive the step loop
(each complete step recorded once: state, tokens and metrics from the same event), finish, meter.

The service knows nothing of HTTP: the routes (``router_service/api.py``) translate a request into a call here
and the events back into a response. Its errors are ``APIError`` (an OpenAI error with its status) and
``RateLimited`` (a 429 the API gives its headers).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from redis.exceptions import RedisError

from cluster import metrics
from cluster.config import ClusterConfig, PoolRole
from router_service import responses
from router_service.budgets import LargeStepBudgets
from router_service.errors import APIError
from router_service.fairness import FairShares
from router_service.loop import AnswerDone, LoopEvent, LoopRequest, PoolClient, StepDone, StepLoop
from router_service.policy import needs_glimpse
from router_service.prompts import PromptRenderer
from router_service.request_settings import check_context, request_settings
from router_service.state import (
    CANCELLED,
    FAILED,
    FINISHED,
    RequestNotFound,
    RequestState,
    RequestStateStore,
    StateConflict,
    StepRecord,
    StoredRequest,
)
from router_service.tau_control import TauController
from router_service.tenancy import Admission, Tenant, TenantStore, admin_tenant, is_admin_key

log = logging.getLogger("ray.serve")
POOL_ERRORS = (RayError, RayServeException)  # a pool call that failed after its retry
ID_PREFIXES = {"chat": "chatcmpl-", "completions": "cmpl-"}  # a request's id: the prefix, then its HTTP request's id
BASE_ID = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")  # what a client's x-request-id may be
MAX_LIST_LIMIT = 100


def prefilled(tenant: str, pool: str, prompt_tokens: int, cached_tokens: int) -> None:
    """Count a call's prompt tokens the pool's prefix cache did not hold (``glimprouter_prefill_tokens``)."""
    metrics.inc("glimprouter_prefill_tokens", max(0, prompt_tokens - cached_tokens), tenant=tenant, pool=pool)


def completion_id(endpoint: str, base_id: str) -> str:
    """The id of a request (the response's ``id``, the key of its state) from its HTTP request's id."""
    return ID_PREFIXES[endpoint] + base_id


@dataclass
class Run:
    """A request admitted and stored, ready to drive: ``done`` holds the steps complete before this run."""

    tenant: Tenant
    loop: LoopRequest
    stored: StoredRequest
    done: list[StepRecord]
    admission: Admission


@dataclass(frozen=True)
class Finished:
    """The request's end, after its ``AnswerDone``: every step and the usage recorded for the tenant."""

    answer: AnswerDone
    steps: list[StepRecord]
    usage: dict


async def redis_call(awaitable):
    """Await a Redis-backed call: outages become 503, missing requests 404, lease conflicts 409."""
    try:
        return await awaitable
    except RequestNotFound as exc:
        raise APIError(404, f"request {exc.args[0]} not found", code="request_not_found") from None
    except StateConflict as exc:
        raise APIError(409, str(exc), code="conflict") from None
    except (RedisError, OSError) as exc:
        raise APIError(
            503,
            f"state store unavailable ({type(exc).__name__}); retry later",
            code="redis_unavailable",
            headers={"Retry-After": "1"},
        ) from None


class RequestService:
    """Requests of one router replica (``replica`` names it as the owner of the requests it runs)."""

    def __init__(
        self,
        cfg: ClusterConfig,
        redis,
        pools: Mapping[PoolRole, PoolClient],
        renderers: Mapping[PoolRole, PromptRenderer],
        replica: str,
    ):
        # tenants under saturation: the fair queue in front of the pools (when enabled), large-step budgets
        self.fairness = FairShares(cfg.router.fairness)
        self.budgets = LargeStepBudgets(cfg.router.large_step_budget)
        pools = self.fairness.wrap(pools)
        self.cfg, self.replica, self.pools, self.renderers = cfg, replica, pools, renderers
        self.store = RequestStateStore(redis, ttl_s=cfg.redis.request_ttl_s, lease_s=cfg.router.lease_s)
        self.tenants = TenantStore(redis)
        self.admin = admin_tenant(cfg.router.policy, cfg.router.steps.token_budget)
        control = cfg.router.tau_controller
        self.tau_controller = TauController(control) if control.enabled else None
        self.loop = StepLoop(pools, renderers, self.tau_controller, self.budgets)
        self.large_fraction = metrics.LargeFraction()
        self._background: list[asyncio.Task] = []
        self._started = False

    def start_background(self) -> None:
        """Once, in the running event loop: export the fair queues' depths (which starts the refresh that keeps
        every gauge exported, ``cluster/metrics.py``) and start the tau controller."""
        if self._started:
            return
        self._started = True
        self.fairness.report_queues()
        if self.tau_controller is not None:
            self._background.append(asyncio.create_task(self._control_tau()))

    # ---- reads ----------------------------------------------------------------------------------------

    async def authenticate(self, key: str) -> Tenant:
        """The tenant of an API key (the admin key is a tenant of its own); 401 for any other key."""
        if is_admin_key(key):
            return self.admin
        tenant = await redis_call(self.tenants.authenticate(key))
        if tenant is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return tenant

    async def trace(self, tenant: Tenant, request_id: str) -> dict:
        """The whole trace of one of the tenant's requests (404 for anyone else's; the admin sees every one), by
        its id or by its HTTP request's id (``x-request-id``)."""
        return (await redis_call(self._find(tenant, request_id))).trace()

    async def _find(self, tenant: Tenant, request_id: str) -> RequestState:
        prefixed = request_id.startswith(tuple(ID_PREFIXES.values()))
        for rid in [request_id] if prefixed else [prefix + request_id for prefix in ID_PREFIXES.values()]:
            try:
                owner = await self.store.tenant_of(rid) if tenant is self.admin else tenant.name
                return await self.store.get(owner, rid)
            except RequestNotFound:
                continue
        raise RequestNotFound(request_id)

    async def request_ids(self, tenant: Tenant, limit: int) -> tuple[list[str], bool]:
        """Ids of the tenant's own requests, newest first (the admin's: every tenant's, as ``tenant/id``), at most
        ``limit``, and whether there are more."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise APIError(400, f"limit must be from 1 to {MAX_LIST_LIMIT}, not {limit}", param="limit")
        return await redis_call(self.store.list_ids(None if tenant is self.admin else tenant.name, limit))

    async def tenant_usage(self, name: str, day: str | None) -> dict:
        """A tenant's usage per pool for one UTC day."""
        tenant = await redis_call(self.tenants.get_tenant(name))
        if tenant is None:
            raise APIError(404, f"tenant {name!r} not found", code="tenant_not_found")
        try:
            usage = await redis_call(self.tenants.usage(name, day))
        except ValueError:
            raise APIError(400, f"day must be YYYY-MM-DD, not {day!r}", param="day") from None
        return {**usage, "max_large_fraction": tenant.settings.policy.max_large_fraction}

    # ---- a request's start ----------------------------------------------------------------------------

    async def start(self, tenant: Tenant, body, endpoint: str, base_id: str | None = None) -> Run:
        """Settle a validated body's settings, admit it and store it as a running request owned here, under the id
        ``completion_id(endpoint, base_id)`` (``base_id``: the HTTP request's id; a new one if None)."""
        if body.model != self.cfg.name or not tenant.settings.allows_model(body.model):
            raise APIError(
                404,
                f"model {body.model!r} does not exist or you have no access to it",
                param="model",
                code="model_not_found",
            )
        policy, steps = request_settings(self.cfg.router.steps, tenant, body)
        priority = body.priority or tenant.settings.priority
        if not tenant.settings.allows_priority(priority):
            raise APIError(
                400,
                f"priority {priority!r} is above this key's class {tenant.settings.priority!r}",
                param="priority",
                code="priority_not_allowed",
            )
        messages = body.chat()
        stored = StoredRequest(
            endpoint=endpoint,
            model=body.model,
            messages=messages,
            policy=policy,
            steps=steps,
            temperature=body.temperature if body.temperature is not None else steps.temperature,
            top_p=body.top_p if body.top_p is not None else steps.top_p,
            seed=body.seed,
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            prompt_tokens=check_context(self.cfg, self.renderers, messages, steps),
            user=body.user,
            priority=priority,
        )
        request_id = completion_id(endpoint, base_id or uuid.uuid4().hex)
        self.fairness.check_admission(priority)  # 503 while the fair queue is past this class's depth
        admission = await redis_call(self.tenants.admit(tenant, request_id))
        try:
            await redis_call(self.store.create(tenant.name, request_id, stored, self.replica))
        except BaseException:
            await self.tenants.release(tenant, request_id)
            raise
        self.fairness.register(request_id, tenant.name, tenant.settings.weight, priority)
        return Run(tenant, self._loop_request(tenant, request_id, stored, stored.stream), stored, [], admission)

    async def resume(self, tenant: Tenant, request_id: str, stream: bool) -> Run:
        """Take over one of the tenant's running requests whose owner died, from its last complete step."""
        request_id = (await redis_call(self._find(tenant, request_id))).request_id
        await redis_call(self.store.claim(tenant.name, request_id, self.replica))
        state = await redis_call(self.store.get(tenant.name, request_id))
        admission = await redis_call(self.tenants.admit(tenant, request_id))
        self.fairness.register(request_id, tenant.name, tenant.settings.weight, state.request.priority)
        return Run(
            tenant, self._loop_request(tenant, request_id, state.request, stream), state.request, state.steps, admission
        )

    @staticmethod
    def _loop_request(tenant: Tenant, request_id: str, stored: StoredRequest, stream: bool) -> LoopRequest:
        return LoopRequest(
            request_id,
            stored.messages,
            stored.policy,
            stored.steps,
            stored.temperature,
            stored.top_p,
            stored.seed,
            stream,
            (tenant.settings.tau_floor, tenant.settings.tau_ceiling),
            tenant.name,
            stored.priority,
        )

    # ---- driving it -----------------------------------------------------------------------------------

    async def events(self, run: Run) -> AsyncIterator[LoopEvent | Finished]:
        """The loop's events, then one ``Finished``. Every complete step is stored (with its tokens charged and
        its metrics) before the next begins; the request's end (finished, failed, cancelled) is stored; the
        admission is released at the end, whatever happened."""
        tenant, req, rid = run.tenant, run.loop, run.loop.request_id
        steps = list(run.done)
        start, outcome, first_output = time.perf_counter(), FAILED, True
        try:
            async for event in self.loop.run(req, run.done):
                if first_output:  # every event carries output: a token (streamed) or a step, then the answer
                    metrics.observe(
                        "glimprouter_request_ttft_seconds", time.perf_counter() - start, stream=str(req.stream).lower()
                    )
                    first_output = False
                if isinstance(event, StepDone):
                    await self._record_step(tenant, rid, event)
                    steps.append(event.record)
                    yield event
                elif isinstance(event, AnswerDone):
                    usage = await self._finish(run, steps, event)
                    outcome = FINISHED
                    yield event
                    yield Finished(event, steps, usage)
                else:
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            outcome = CANCELLED
            await self._end_quietly(tenant.name, rid, CANCELLED, "client disconnected")
            raise
        except POOL_ERRORS as exc:
            await self._end_quietly(tenant.name, rid, FAILED, f"pool unavailable: {type(exc).__name__}")
            raise APIError(
                503,
                "a model pool is unavailable; retry, or resume the request",
                code="pool_unavailable",
                headers={"Retry-After": "2"},
            ) from None
        except APIError as exc:
            if exc.status != 409:
                await self._end_quietly(tenant.name, rid, FAILED, exc.message)
            raise
        except Exception as exc:
            await self._end_quietly(tenant.name, rid, FAILED, f"internal error: {type(exc).__name__}")
            raise
        finally:
            metrics.inc("glimprouter_requests", tenant=tenant.name, policy=req.policy.policy, outcome=outcome)
            metrics.observe(
                "glimprouter_request_latency_seconds", time.perf_counter() - start, policy=req.policy.policy
            )
            self.fairness.unregister(rid)
            self.budgets.forget(rid)
            await asyncio.shield(self._release(tenant, rid))

    async def _record_step(self, tenant: Tenant, rid: str, event: StepDone) -> None:
        """Store one complete step, charge its tokens, renew the admission (one round trip), then its metrics."""
        step = event.record
        with metrics.timed("glimprouter_redis_latency_seconds", op="append_step"):
            await redis_call(
                asyncio.gather(
                    self.store.append_step(tenant.name, rid, self.replica, step, event.glimpsed),
                    self.tenants.charge_tokens(tenant, step.pool, step.output_tokens),
                    self.tenants.heartbeat(tenant, rid),
                )
            )
        metrics.inc("glimprouter_steps", tenant=tenant.name, pool=step.pool)
        metrics.inc("glimprouter_tokens", step.output_tokens, tenant=tenant.name, pool=step.pool)
        prefilled(tenant.name, step.pool, step.prompt_tokens, step.cached_tokens)
        prefilled(tenant.name, "small", step.glimpse_prompt_tokens, step.glimpse_cached_tokens)
        metrics.observe("glimprouter_step_latency_seconds", step.step_ms / 1e3, pool=step.pool)
        if event.glimpsed:
            metrics.inc("glimprouter_glimpses", tenant=tenant.name)
            metrics.observe("glimprouter_glimpse_latency_seconds", step.glimpse_ms / 1e3)
        if step.entropy is not None:
            metrics.observe("glimprouter_first_token_entropy_nats", step.entropy)
        self.large_fraction.record(step.pool)

    async def _finish(self, run: Run, steps: list[StepRecord], answer: AnswerDone) -> dict:
        """Store the final answer, charge its tokens and record the request's usage (one round trip); returns
        the response's usage. glimprouter glimpses before every step."""
        tenant, rid = run.tenant, run.loop.request_id
        glimpses = len(steps) if needs_glimpse(run.loop.policy) else 0
        usage = responses.usage(steps, answer, run.stored.prompt_tokens, glimpses)
        final = {
            "text": answer.text,
            "pool": answer.pool,
            "output_tokens": answer.output_tokens,
            "prompt_tokens": answer.prompt_tokens,
            "finish_reason": answer.finish_reason,
            "ms": answer.ms,
        }
        meters = [
            self.tenants.record_usage(
                tenant,
                pool,
                requests=int(pool == answer.pool),
                prompt_tokens=usage["prompt_tokens"] if pool == answer.pool else 0,
                output_tokens=counts["completion_tokens"],
                steps=counts["steps"],
                glimpses=counts.get("glimpses", 0),
            )
            for pool, counts in usage["per_pool"].items()
        ]
        with metrics.timed("glimprouter_redis_latency_seconds", op="finish"):
            await redis_call(
                asyncio.gather(
                    self.tenants.charge_tokens(tenant, answer.pool, answer.output_tokens),
                    self.store.finish(tenant.name, rid, self.replica, final),
                    *meters,
                )
            )
        metrics.inc("glimprouter_tokens", answer.output_tokens, tenant=tenant.name, pool=answer.pool)
        prefilled(tenant.name, answer.pool, answer.prompt_tokens, answer.cached_tokens)
        return usage

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

    async def _control_tau(self) -> None:
        """Sample the large pool's in-flight calls every interval and let the controller move tau."""
        while True:
            await asyncio.sleep(self.tau_controller.settings.interval_s)
            direction = self.tau_controller.update(
                self.pools["large"].in_flight, self.fairness.registry.active_classes()
            )
            if direction:
                metrics.inc("glimprouter_tau_changes", direction=direction)
            metrics.set_gauge("glimprouter_tau_offset_nats", self.tau_controller.offset)
