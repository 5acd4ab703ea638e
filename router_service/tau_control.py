"""Load-aware tau (beyond the paper): raise tau while the large pool's queue is long, lower it as it drains.

The controller keeps one offset per priority class and router replica, added to each request's own tau and
clamped to the tenant's floor and ceiling. Under pressure it raises the lowest class that has running requests
first (batch, then standard, then interactive), each up to ``max_offset_nats`` before the next class moves: the
quality of batch traffic degrades before a higher class's does. As the queue drains it lowers the highest
class first. Each change is logged and counted (``glimprouter_tau_changes``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from cluster.config import PRIORITY_CLASSES, PolicySettings, PriorityClass, TauControllerSettings

log = logging.getLogger("ray.serve")


class TauController:
    """Offsets of tau per class, driven by the large pool's in-flight calls (sampled every ``interval_s``)."""

    def __init__(self, settings: TauControllerSettings) -> None:
        self.settings = settings
        self.offsets: dict[PriorityClass, float] = {c: 0.0 for c in PRIORITY_CLASSES}

    @property
    def offset(self) -> float:
        """The largest offset of any class (what the replica's gauge shows)."""
        return max(self.offsets.values())

    def update(self, large_in_flight: int, active: Collection[PriorityClass] | None = None) -> str | None:
        """Move one class's offset one step for this queue sample; returns "up", "down" or None (no change).
        ``active``: the classes with running requests (None: all), the only ones raised."""
        s = self.settings
        if large_in_flight > s.queue_high:
            lowest_first = [c for c in reversed(PRIORITY_CLASSES) if active is None or c in active]
            moved = next((c for c in lowest_first if self.offsets[c] < s.max_offset_nats), None)
            if moved is None:
                return None
            self.offsets[moved] = min(s.max_offset_nats, self.offsets[moved] + s.step_nats)
            direction = "up"
        elif large_in_flight < s.queue_low:
            moved = next((c for c in PRIORITY_CLASSES if self.offsets[c] > 0), None)
            if moved is None:
                return None
            self.offsets[moved] = max(0.0, self.offsets[moved] - s.step_nats)
            direction = "down"
        else:
            return None
        log.info(
            "tau controller: large pool in flight %d, %s tau offset %s to %.2f",
            large_in_flight,
            moved,
            direction,
            self.offsets[moved],
        )
        return direction

    def apply(
        self, policy: PolicySettings, floor: float | None, ceiling: float | None, priority: PriorityClass = "standard"
    ) -> PolicySettings:
        """``policy`` with its tau raised by its class's offset and clamped to [floor, ceiling] (when given)."""
        offset = self.offsets[priority]
        if policy.policy != "glimprouter" or (offset == 0 and floor is None and ceiling is None):
            return policy
        tau = policy.tau + offset
        tau = max(tau, floor) if floor is not None else tau
        tau = min(tau, ceiling) if ceiling is not None else tau
        return policy.model_copy(update={"tau": tau})
