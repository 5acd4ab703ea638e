"""Load-aware tau (beyond the paper): raise tau while the large pool's queue is long, lower it as it drains.

The controller keeps one offset per router replica, added to each request's own tau and clamped to the
tenant's floor and ceiling. Each change is logged and counted (``glimprouter_tau_changes``).
"""

from __future__ import annotations

import logging

from cluster.config import PolicySettings, TauControllerSettings

log = logging.getLogger("ray.serve")


class TauController:
    """Offset of tau driven by the large pool's in-flight calls (sampled every ``interval_s``)."""

    def __init__(self, settings: TauControllerSettings) -> None:
        self.settings = settings
        self.offset = 0.0

    def update(self, large_in_flight: int) -> str | None:
        """Move the offset one step for this queue sample; returns "up", "down" or None (no change)."""
        s = self.settings
        if large_in_flight > s.queue_high and self.offset < s.max_offset_nats:
            self.offset = min(s.max_offset_nats, self.offset + s.step_nats)
            direction = "up"
        elif large_in_flight < s.queue_low and self.offset > 0:
            self.offset = max(0.0, self.offset - s.step_nats)
            direction = "down"
        else:
            return None
        log.info(
            "tau controller: large pool in flight %d, tau offset %s to %.2f", large_in_flight, direction, self.offset
        )
        return direction

    def apply(self, policy: PolicySettings, floor: float | None, ceiling: float | None) -> PolicySettings:
        """``policy`` with its tau raised by the offset and clamped to [floor, ceiling] (when given)."""
        if policy.policy != "glimprouter" or (self.offset == 0 and floor is None and ceiling is None):
            return policy
        tau = policy.tau + self.offset
        tau = max(tau, floor) if floor is not None else tau
        tau = min(tau, ceiling) if ceiling is not None else tau
        return policy.model_copy(update={"tau": tau})
