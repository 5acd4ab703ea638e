"""Tenants and their API keys: create, list, update, delete tenants; create, rotate, revoke and check keys.

API keys look like ``gr-1a2b3c4d-<secret>``; ``gr-1a2b3c4d`` is the prefix that names the key in
listings and logs. Only the key's SHA-256 is stored; the plaintext is returned once, at creation,
and is never logged nor put in an exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass

from router_service.tenancy.settings import (
    KeyNotFound,
    Tenant,
    TenantExists,
    TenantKeys,
    TenantNotFound,
    TenantSettings,
    check_tenant_name,
    tenant_name,
    text,
)

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^(gr-[0-9a-f]{8})-[A-Za-z0-9_-]{20,128}$")
_PREFIX_RE = re.compile(r"^gr-[0-9a-f]{8}$")
ADMIN_KEY_ENV = "GLIMP_ADMIN_KEY"


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as listed: its prefix and creation time (epoch seconds), never the secret."""

    prefix: str
    created: float


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str | None:
    """The identifying prefix (``gr-1a2b3c4d``) of a well-formed API key, else None."""
    match = _KEY_RE.match(key or "")
    return match.group(1) if match else None


def is_admin_key(key: str | None) -> bool:
    """Whether ``key`` is the bootstrap admin key of ``GLIMP_ADMIN_KEY`` (constant-time; False if unset)."""
    admin = os.environ.get(ADMIN_KEY_ENV, "")
    if not admin or not key:
        return False
    return hmac.compare_digest(_hash_key(key), _hash_key(admin))


# Returns 1, 0 if the prefix is taken, -1 if the tenant is gone.
_CREATE_KEY_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'hash', ARGV[2], 'created', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[3])
return 1
"""


class TenantDirectory(TenantKeys):
    """Tenants and API keys in Redis. Nothing is cached locally: every call reads Redis, so changes are seen
    at once by every replica."""

    def __init__(self, redis, namespace: str = "glimp"):
        TenantKeys.__init__(self, redis, namespace)
        self._create_key = redis.register_script(_CREATE_KEY_LUA)

    # -- tenants --------------------------------------------------------------------------------

    async def create_tenant(self, name: str, settings: TenantSettings | None = None) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; returns the tenant and the key's plaintext (shown once)."""
        tenant = Tenant(name=check_tenant_name(name), settings=settings or TenantSettings())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._settings_key(name), tenant.settings.model_dump_json(), nx=True)
            pipe.sadd(f"{self.namespace}:tenants", name)
            created, _ = await pipe.execute()
        if not created:
            raise TenantExists(f"tenant {name!r} exists already")
        log.info("created tenant %s", name)
        return tenant, await self.create_key(name)

    async def get_tenant(self, name: str) -> Tenant | None:
        """The tenant, or None."""
        raw = await self.redis.get(self._settings_key(name))
        return None if raw is None else Tenant(name=name, settings=TenantSettings.model_validate_json(raw))

    async def require_tenant(self, name: str) -> Tenant:
        """The tenant, or TenantNotFound."""
        tenant = await self.get_tenant(name)
        if tenant is None:
            raise TenantNotFound(f"no tenant {name!r}")
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        """All tenants, by name."""
        names = sorted(text(n) for n in await self.redis.smembers(f"{self.namespace}:tenants"))
        if not names:
            return []
        raws = await self.redis.mget([self._settings_key(n) for n in names])
        return [
            Tenant(name=n, settings=TenantSettings.model_validate_json(r))
            for n, r in zip(names, raws, strict=True)
            if r is not None
        ]

    async def update_settings(self, name: str, changes: dict) -> Tenant:
        """Apply ``changes`` (a partial settings dict; ``policy`` may be partial too) and return the tenant."""
        current = (await self.require_tenant(name)).settings.model_dump()
        changes = dict(changes)
        if "policy" in changes:
            changes["policy"] = {**current["policy"], **changes["policy"]}
        tenant = Tenant(name=name, settings=TenantSettings.model_validate({**current, **changes}))
        if not await self.redis.set(self._settings_key(name), tenant.settings.model_dump_json(), xx=True):
            raise TenantNotFound(f"no tenant {name!r}")
        log.info("updated tenant %s: %s", name, sorted(changes))
        return tenant

    async def delete_tenant(self, name: str) -> None:
        """Revoke all the tenant's keys, then delete all its data (settings, limits, usage, request state)."""
        await self.require_tenant(name)
        for info in await self.list_keys(name):
            await self.revoke_key(info.prefix)
        await self.redis.srem(f"{self.namespace}:tenants", name)
        batch = []
        async for key in self.redis.scan_iter(match=self._base(name) + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self.redis.unlink(*batch)
                batch = []
        if batch:
            await self.redis.unlink(*batch)
        log.info("deleted tenant %s", name)

    # -- API keys -------------------------------------------------------------------------------

    async def create_key(self, tenant: Tenant | str) -> str:
        """A new API key of the tenant; returns its plaintext, which is stored only as a hash."""
        name = tenant_name(tenant)
        while True:
            prefix = f"gr-{secrets.token_hex(4)}"
            key = f"{prefix}-{secrets.token_urlsafe(32)}"
            keys = [self._key_record(prefix), self._tenant_keys_key(name), self._settings_key(name)]
            done = await self._create_key(keys=keys, args=[name, _hash_key(key), repr(time.time()), prefix])
            if done == -1:
                raise TenantNotFound(f"no tenant {name!r}")
            if done == 1:
                log.info("created key %s for tenant %s", prefix, name)
                return key

    async def list_keys(self, tenant: Tenant | str) -> list[ApiKeyInfo]:
        """The tenant's keys (prefix and creation time), oldest first."""
        entries = await self.redis.hgetall(self._tenant_keys_key(tenant_name(tenant)))
        infos = [ApiKeyInfo(text(p), float(text(c))) for p, c in entries.items()]
        return sorted(infos, key=lambda i: (i.created, i.prefix))

    async def rotate_key(self, tenant: Tenant | str, prefix: str) -> str:
        """Replace the tenant's key ``prefix`` by a new one (plaintext returned); the old one is revoked."""
        name = tenant_name(tenant)
        if not await self.redis.hexists(self._tenant_keys_key(name), prefix):
            raise KeyNotFound(f"tenant {name!r} has no key {prefix!r}")
        key = await self.create_key(name)
        await self.revoke_key(prefix)
        return key

    async def revoke_key(self, prefix: str) -> str:
        """Revoke the key ``prefix`` at once for every replica; returns the tenant it belonged to."""
        if not _PREFIX_RE.match(prefix or ""):
            raise KeyNotFound("not a key prefix (expected gr-<8 hex>); the argument is not echoed, it may be a key")
        owner = await self.redis.hget(self._key_record(prefix), "tenant")
        if owner is None:
            raise KeyNotFound(f"no key {prefix!r}")
        name = text(owner)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key_record(prefix))
            pipe.hdel(self._tenant_keys_key(name), prefix)
            await pipe.execute()
        log.info("revoked key %s of tenant %s", prefix, name)
        return name

    async def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant owning API key ``key``, or None (malformed, unknown, revoked, or tenant deleted)."""
        prefix = key_prefix(key or "")
        if prefix is None:
            return None
        record = {text(k): text(v) for k, v in (await self.redis.hgetall(self._key_record(prefix))).items()}
        if "hash" not in record or not hmac.compare_digest(record["hash"], _hash_key(key)):
            log.debug("authentication failed for key %s", prefix)
            return None
        return await self.get_tenant(record["tenant"])
