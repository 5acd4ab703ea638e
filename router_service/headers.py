"""HTTP headers of rate limits, as OpenAI's ``x-ratelimit-*`` headers tell them, and ``Retry-After``.

The plain ``-tokens`` headers report the pool closest to its limit; ``-tokens-small`` and ``-tokens-large``
report each pool.
"""

from __future__ import annotations

import math

from router_service.tenancy import POOLS, RateLimited, RateLimitState


def duration(seconds: float) -> str:
    """OpenAI-style duration: ``1.5s``, ``6m0s``."""
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"


def ratelimit_headers(state: RateLimitState) -> dict[str, str]:
    """The rate-limit headers of a response."""
    tight = min(POOLS, key=lambda p: state.remaining_tokens[p] / state.limit_tokens[p])
    reset = duration(state.reset_s)
    reset_tokens = duration(state.reset_s if state.reset_tokens_s is None else state.reset_tokens_s)
    headers = {
        "x-ratelimit-limit-requests": str(state.limit_requests),
        "x-ratelimit-remaining-requests": str(state.remaining_requests),
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-limit-tokens": str(state.limit_tokens[tight]),
        "x-ratelimit-remaining-tokens": str(state.remaining_tokens[tight]),
        "x-ratelimit-reset-tokens": reset_tokens,
    }
    for pool in POOLS:
        headers[f"x-ratelimit-limit-tokens-{pool}"] = str(state.limit_tokens[pool])
        headers[f"x-ratelimit-remaining-tokens-{pool}"] = str(state.remaining_tokens[pool])
    return headers


def refusal_headers(refused: RateLimited) -> dict[str, str]:
    """The headers of a 429: the rate-limit headers and ``Retry-After`` (whole seconds, at least 1)."""
    return {**ratelimit_headers(refused.state), "Retry-After": str(max(1, math.ceil(refused.retry_after_s)))}
