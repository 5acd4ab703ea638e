"""What the simulator is given: a layout (which replicas share which GPU), a request shape and routing, and
the per-call overheads of the router's path. Plain dataclasses; ``simulator.py`` runs them."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

ROLES = ("small", "large")
ARMS = ("stream", "final", "fused", "instep", "random", "large")  # the benchmark's client arms (gpu_bench ARMS)


@dataclass(frozen=True)
class Layout:
    """GPUs, each a tuple of the replicas (roles) it hosts; ``kv_gib`` per role when alone on a GPU or sharing."""

    gpus: tuple[tuple[str, ...], ...]
    name: str = ""

    def count(self, role: str) -> int:
        return sum(g.count(role) for g in self.gpus)

    def __str__(self) -> str:
        return self.name or spec_of(self)


NAMED = {  # loadtests/gpu_bench.py LAYOUTS
    "one-gpu": (("small", "large"),),
    "routed-2gpu": (("small",), ("large",)),
    "shared-2gpu": (("small", "large"), ("small", "large")),
    "routed-dp-2gpu": (("small", "small"), ("large",)),
    "large-only-2gpu": (("large",), ("large",)),
}
KV_GIB = {  # the benchmark's kv_cache_gib: a pool alone on its GPU, sharing it with the other pool, two small
    ("small", 1): 16,
    ("large", 1): 40,
    ("small", 2): 6,
    ("large", 2): 24,
    ("small", "dp"): 12,
}


def parse_layout(text: str) -> Layout:
    """A named layout (``NAMED``) or a spec: GPUs separated by commas, each ``[Kx]ROLE[+ROLE...]`` with roles
    ``s``/``small`` and ``l``/``large``; ``4xs+l,2xl`` is four GPUs of one small and one large replica and two GPUs
    of one large replica each."""
    if text in NAMED:
        return Layout(NAMED[text], text)
    gpus = []
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(?:(\d+)x)?([a-z+]+)", part)
        if not match:
            raise ValueError(f"layout {text!r}: cannot read {part!r} (want e.g. s+l, 2xl, s+s)")
        roles = tuple({"s": "small", "l": "large"}.get(r, r) for r in match.group(2).split("+"))
        if any(r not in ROLES for r in roles) or not roles:
            raise ValueError(f"layout {text!r}: roles are s (small) and l (large), got {part!r}")
        gpus += [roles] * int(match.group(1) or 1)
    return Layout(tuple(gpus))


def spec_of(layout: Layout) -> str:
    """The shortest spec string of a layout (runs of equal GPUs as ``Kx``)."""
    parts, gpus = [], list(layout.gpus)
    while gpus:
        first, k = gpus[0], 1
        while k < len(gpus) and gpus[k] == first:
            k += 1
        roles = "+".join(r[0] for r in first)
        parts.append(f"{k}x{roles}" if k > 1 else roles)
        gpus = gpus[k:]
    return ",".join(parts)


def kv_gib(role: str, gpu: tuple[str, ...]) -> float:
    if len(gpu) == 1:
        return KV_GIB[(role, 1)]
    if all(r == "small" for r in gpu):
        return KV_GIB[("small", "dp")]
    return KV_GIB[(role, 2)] / max(1, gpu.count(role))


@dataclass(frozen=True)
class Routing:
    """Which steps go large: a fraction (``forced``: evenly spaced, the request's own phase or the same phase
    for all; ``random``: each step at random) or an entropy distribution (lognormal per step) and tau."""

    large_fraction: float = 0.25
    placement: str = "per_request"  # per_request | aligned | random
    entropy_mu: float | None = None  # ln-nats: a step's first-token entropy is lognormal(mu, sigma)
    entropy_sigma: float = 0.5
    tau: float | None = None

    def fraction(self) -> float:
        if self.entropy_mu is None or self.tau is None:
            return self.large_fraction
        if self.tau <= 0:
            return 1.0
        return 0.5 * math.erfc((math.log(self.tau) - self.entropy_mu) / (self.entropy_sigma * math.sqrt(2)))

    def schedule(self, steps: int, rng: random.Random) -> list[bool]:
        """True for each step the large pool writes."""
        if self.entropy_mu is not None and self.tau is not None:
            return [rng.lognormvariate(self.entropy_mu, self.entropy_sigma) > self.tau for _ in range(steps)]
        f = self.large_fraction
        if self.placement == "random":
            return [rng.random() < f for _ in range(steps)]
        phase = rng.random() if self.placement == "per_request" else 0.0
        return [math.floor((i + 1) * f + phase) > math.floor(i * f + phase) for i in range(steps)]


@dataclass(frozen=True)
class RequestShape:
    """A request: its prompt, its steps (each ``step_tokens``, or uniform in ``step_tokens_range``), the answer."""

    prompt_tokens: int = 200
    steps: int = 24
    step_tokens: int = 96
    final_tokens: int = 128
    step_tokens_range: tuple[int, int] | None = None
    arm: str = "stream"  # see ARMS; "large" is the large_only policy, "random" the random one (no glimpse)
    routing: Routing = field(default_factory=Routing)

    def step_lengths(self, rng: random.Random) -> list[int]:
        if self.step_tokens_range is None:
            return [self.step_tokens] * self.steps
        lo, hi = self.step_tokens_range
        return [rng.randint(lo, hi) for _ in range(self.steps)]

    def large_steps(self, rng: random.Random) -> list[bool]:
        if self.arm == "large":
            return [True] * self.steps
        if self.arm == "random":
            return Routing(self.routing.large_fraction, "random").schedule(self.steps, rng)
        return self.routing.schedule(self.steps, rng)

    @property
    def glimpses(self) -> bool:
        return self.arm not in ("large", "random")


@dataclass(frozen=True)
class CallCost:
    """Time a call spends outside the engine (router, Serve handle, replica front end): ``base_ms`` plus
    ``per_open_ms`` for every call open at that replica when it starts (they share its event loop)."""

    base_ms: float
    per_open_ms: float

    def ms(self, open_calls: int) -> float:
        return self.base_ms + self.per_open_ms * open_calls


@dataclass(frozen=True)
class Overheads:
    """Per-call costs outside the engines, by call kind, and the router's own cost per step and per request."""

    glimpse: CallCost = CallCost(7.0, 2.0)
    small_step: CallCost = CallCost(10.0, 3.0)
    large_step: CallCost = CallCost(15.0, 0.0)
    per_step_ms: float = 1.0  # persisting the step (Redis)
    per_request_ms: float = 70.0  # router, Serve proxy, HTTP and client, once a request

    def for_call(self, kind: str) -> CallCost:
        return {"glimpse": self.glimpse, "small": self.small_step}.get(kind, self.large_step)
