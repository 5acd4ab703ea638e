"""Tenant API keys for the load tests: from a file of keys one a line, or of what
``python -m cluster tenants create NAME --json`` prints (one or more JSON objects, each with a ``key``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


def parse_keys(text: str) -> list[str]:
    """The keys in ``text``: JSON values (objects with a ``key``, strings, lists of them) one after another,
    else one key a line; blank lines are skipped."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[", '"')):
        return [line.strip() for line in stripped.splitlines() if line.strip()]
    decoder, keys, at = json.JSONDecoder(), [], 0
    while at < len(stripped):
        value, end = decoder.raw_decode(stripped, at)
        keys += _keys_of(value)
        at = end
        while at < len(stripped) and stripped[at].isspace():
            at += 1
    return keys


def _keys_of(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [key for item in value for key in _keys_of(item)]
    if isinstance(value, dict) and isinstance(value.get("key"), str):
        return [value["key"]]
    raise ValueError(f"no API key in {json.dumps(value)[:80]}: expected a key, or an object with a 'key'")


def api_keys(env: Mapping[str, str] = os.environ) -> list[str]:
    """Keys from ``GLIMP_API_KEYS`` (comma-separated) or the file named by ``GLIMP_KEYS_FILE`` (none if neither)."""
    if env.get("GLIMP_API_KEYS"):
        return [k.strip() for k in env["GLIMP_API_KEYS"].split(",") if k.strip()]
    if env.get("GLIMP_KEYS_FILE"):
        return parse_keys(Path(env["GLIMP_KEYS_FILE"]).read_text())
    return []
