"""A tenant's data: its name, settings and limits, the errors of tenancy, and the Redis key names it owns.

Layout (``ns`` is the namespace, default ``glimp``)::

    {ns}:tenants                      set of tenant names
    {ns}:t:{tenant}:settings          TenantSettings as JSON
    {ns}:t:{tenant}:keys              hash  key prefix -> creation time
    {ns}:t:{tenant}:rl:req            sorted set  admission -> time (ms): the sliding window of requests
    {ns}:t:{tenant}:rl:tok:{pool}     sorted set  charge "id:tokens" -> time (ms): the sliding window of tokens
    {ns}:t:{tenant}:rl:tok:{pool}:sum tokens of that window's charges (kept with the set)
    {ns}:t:{tenant}:inflight          sorted set  request id -> expiry (ms)
    {ns}:t:{tenant}:usage:{day}:{pool}  hash of usage counters of one UTC day
    {ns}:t:{tenant}:req:...           request state (see ``TenantKeys.request_key_prefix``)
    {ns}:keys:{prefix}                hash  tenant, sha256 of the key, creation time
"""

from __future__ import annotations

import re

from pydantic import Field

from cluster.config import PRIORITY_CLASSES, PolicySettings, PoolRole, PriorityClass, StrictModel

TENANT_NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
POOLS: tuple[PoolRole, ...] = ("small", "large")


class TenantSettings(StrictModel):
    """One tenant's defaults and limits."""

    policy: PolicySettings = Field(
        default_factory=PolicySettings, description="Default routing policy and tau of the tenant's requests."
    )
    max_token_budget: int = Field(
        8192, ge=1, le=1_000_000, description="Ceiling on a request's token budget (all steps together)."
    )
    allowed_models: list[str] = Field(
        default_factory=list, description="Model names the tenant may ask for; empty means all."
    )
    requests_per_minute: int = Field(
        60, ge=1, le=1_000_000, description="Requests admitted per rate-limit window (a minute)."
    )
    tokens_per_minute_small: int = Field(
        1_000_000, ge=1, le=1_000_000_000, description="Small-pool tokens per window; none admitted once reached."
    )
    tokens_per_minute_large: int = Field(
        200_000, ge=1, le=1_000_000_000, description="Large-pool tokens per window; none admitted once reached."
    )
    max_concurrent_requests: int = Field(8, ge=1, le=100_000, description="Requests of the tenant in flight at once.")
    tau_floor: float | None = Field(
        None, ge=0, le=10, description="Load-aware tau never goes below this (None: the request's tau)."
    )
    tau_ceiling: float | None = Field(
        None, ge=0, le=10, description="Load-aware tau never goes above this (None: no ceiling)."
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="Fair share under saturation: each pool's tokens are shared "
        "among the active tenants in proportion to their weights.",
    )
    priority: PriorityClass = Field(
        "standard",
        description="Class of the tenant's requests (interactive > standard > "
        "batch) and the highest a request may ask for: under load, lower classes are "
        "queued, their tau raised and their admissions refused first.",
    )

    def allows_model(self, model: str) -> bool:
        """Whether the tenant may use ``model``."""
        return not self.allowed_models or model in self.allowed_models

    def allows_priority(self, priority: PriorityClass) -> bool:
        """Whether a request may ask for class ``priority`` (at most the tenant's own class)."""
        return PRIORITY_CLASSES.index(priority) >= PRIORITY_CLASSES.index(self.priority)

    def tokens_per_minute(self, pool: PoolRole) -> int:
        """The token limit of ``pool``."""
        return self.tokens_per_minute_large if pool == "large" else self.tokens_per_minute_small


class Tenant(StrictModel):
    """A tenant: its name and settings."""

    name: str = Field(pattern=TENANT_NAME_RE, description="Lower-case name, also part of its Redis keys.")
    settings: TenantSettings = Field(default_factory=TenantSettings, description="Defaults and limits.")


def admin_tenant(policy: PolicySettings, max_token_budget: int) -> Tenant:
    """The operator's tenant (the admin key): the router's policy and budget, practically no limits, top class."""
    settings = TenantSettings(
        policy=policy,
        max_token_budget=max_token_budget,
        requests_per_minute=1_000_000,
        max_concurrent_requests=100_000,
        priority="interactive",
    )
    return Tenant(name="admin", settings=settings)


class TenancyError(Exception):
    """Base of this module's errors; messages name keys by prefix only."""


class InvalidTenantName(TenancyError, ValueError):
    """A tenant name does not match ``TENANT_NAME_RE``."""


class TenantNotFound(TenancyError, LookupError):
    """No such tenant."""


class TenantExists(TenancyError):
    """A tenant of that name exists already."""


class KeyNotFound(TenancyError, LookupError):
    """No such API key (prefix), or not the tenant's."""


def check_tenant_name(name: str) -> str:
    """``name`` if it is a valid tenant name, else InvalidTenantName."""
    if not isinstance(name, str) or not re.match(TENANT_NAME_RE, name):
        raise InvalidTenantName(f"invalid tenant name {name!r}: must match {TENANT_NAME_RE}")
    return name


def text(value: bytes | str) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def tenant_name(tenant: Tenant | str) -> str:
    """The name of a tenant given as a ``Tenant`` or by name."""
    return tenant.name if isinstance(tenant, Tenant) else tenant


class TenantKeys:
    """The Redis key names of tenants in one namespace (the base of the tenancy stores)."""

    def __init__(self, redis, namespace: str = "glimp"):
        self.redis = redis
        self.namespace = namespace

    def _base(self, tenant: Tenant | str) -> str:
        return f"{self.namespace}:t:{check_tenant_name(tenant_name(tenant))}:"

    def _settings_key(self, name: str) -> str:
        return self._base(name) + "settings"

    def _tenant_keys_key(self, name: str) -> str:
        return self._base(name) + "keys"

    def _key_record(self, prefix: str) -> str:
        return f"{self.namespace}:keys:{prefix}"

    def _usage_key(self, name: str, day: str, pool: str) -> str:
        return self._base(name) + f"usage:{day}:{pool}"

    def request_key_prefix(self, tenant: Tenant | str) -> str:
        """Prefix of the tenant's request-state keys (``{ns}:t:{tenant}:req:``): one tenant cannot reach another's."""
        return self._base(tenant) + "req:"
