"""The one configuration tree: pools, Redis, router. Loaded from YAML, validated by pydantic v2.

Every model forbids unknown keys; validation errors name the field by its dotted path
(``pools.small.autoscaling.max_replicas``). The same models validate the API's extension
fields (``PolicySettings``) and feed the Ray Serve / KubeRay renderers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from cluster.pool_config import PoolRole, PoolsSettings
from cluster.strict import StrictModel

CONFIG_DIR = Path(__file__).parent / "configs"
PolicyName = Literal["glimprouter", "large_only", "small_only", "random", "forced_fraction"]
PriorityClass = Literal["interactive", "standard", "batch"]
PRIORITY_CLASSES: tuple[PriorityClass, ...] = ("interactive", "standard", "batch")  # highest first


class RedisSettings(StrictModel):
    """Redis holding step state (and tenancy)."""

    url: str = Field(
        "redis://127.0.0.1:6379/0", pattern=r"^(redis|rediss|unix)://", description="Redis URL; REDIS_URL overrides it."
    )
    request_ttl_s: int = Field(86_400, ge=60, le=30 * 86_400, description="How long a request's state is kept.")
    socket_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Per-command timeout; an outage gives 503, not a hang."
    )

    def effective_url(self) -> str:
        """The URL in force: the REDIS_URL environment variable overrides the config."""
        return os.environ.get("REDIS_URL", self.url)


class PolicySettings(StrictModel):
    """Routing policy knobs; the router's defaults and a request's overrides share this model."""

    policy: PolicyName = Field("glimprouter", description="Which policy routes each step.")
    tau: float = Field(
        1.0, ge=0, le=10, description="Entropy threshold (nats): H >= tau sends the step to the large pool."
    )
    large_fraction: float = Field(
        0.25, ge=0, le=1, description="'random' policy: fraction of steps sent to the large pool."
    )
    seed: int = Field(0, ge=0, description="'random' and 'forced_fraction': seed (with the request id) of the draws.")
    fused_glimpse: bool = Field(
        False,
        description="After a small step, take the next step's glimpse in the same small-pool call instead of a "
        "separate one, on the same prompt (the step's prompt, text and delimiter, tokenized again in the pool).",
    )
    glimpse_in_step: bool = Field(
        False,
        description="Take each glimpse from the first token of a small-pool step call on the step's prompt, with "
        "its top-k log-probs (the raw distribution, as the greedy glimpse's): one small-pool call per small step "
        "instead "
        "of two. When the step goes to the large pool, the small call is cancelled after that token.",
    )
    max_large_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="glimprouter: a large-step budget. The router steers the tenant's tau from the "
        "entropies of its own recent glimpses so that about this fraction of its steps (the ones of highest entropy) "
        "go to the large pool; `tau` is the starting point until enough glimpses are seen. None: tau alone decides.",
    )

    @field_validator("glimpse_in_step")
    @classmethod
    def _excludes_fused_glimpse(cls, glimpse_in_step: bool, info: ValidationInfo) -> bool:
        if glimpse_in_step and info.data.get("fused_glimpse"):
            raise ValueError("fused_glimpse and glimpse_in_step exclude each other: choose one")
        return glimpse_in_step


class StepSettings(StrictModel):
    """The step loop's constants (glimprouter-algorithm.md)."""

    top_k: int = Field(20, ge=2, le=20, description="Log-probs of the glimpse used for the entropy.")
    delimiter: str = Field("\n\n", min_length=1, description="Step delimiter (stop string of each step).")
    step_max_tokens: int = Field(512, ge=1, le=32_768, description="Most tokens of one step.")
    token_budget: int = Field(8192, ge=1, le=1_000_000, description="Most output tokens of all steps together.")
    final_max_tokens: int = Field(2048, ge=1, le=32_768, description="Most tokens of the final answer.")
    temperature: float = Field(0.6, ge=0, le=2, description="Step sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Step nucleus sampling.")
    ignore_eos: bool = Field(
        False, description="Benchmarks on random weights: steps and answer run to their token limits."
    )
    cap_last_step: bool = Field(
        False,
        description="Serving variant: cap each step at what is left of token_budget, so the steps never exceed "
        "it. The reference (default) gives every step its full step_max_tokens and stops after the step that reaches "
        "the budget, keeping that step whole.",
    )
    stop_on_eos: bool = Field(
        False,
        description="Serving variant: end the thinking phase after a step that ends with EOS. The reference "
        "(default) writes the next step from the prefix as usual.",
    )
    completion_limit: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Most completion tokens of the whole request, reasoning and answer "
        "together (a request's max_completion_tokens): every step is capped at what is left of it, the answer gets "
        "the rest. None: no such limit.",
    )

    def reasoning_budget(self) -> int:
        """The output tokens after which no step starts: the token budget, within the completion limit."""
        return min(self.token_budget, self.completion_limit or self.token_budget)

    def most_reasoning_tokens(self) -> int:
        """The most output tokens the steps can take: the last step may cross the budget unless it is capped."""
        if self.cap_last_step or self.completion_limit is not None:
            return self.reasoning_budget()
        return self.token_budget - 1 + self.step_max_tokens


class TauControllerSettings(StrictModel):
    """Load-aware tau (beyond the paper): while the large pool's queue is long, tau rises so fewer steps go
    there, for the lowest priority class with running requests first; it falls back as the queue drains, for the
    highest class first. Off by default: the paper's fixed tau is the reference."""

    enabled: bool = Field(False, description="Adjust tau by the large pool's queue.")
    queue_high: int = Field(
        8, ge=1, le=100_000, description="Large-pool calls in flight (per router replica) above which tau rises."
    )
    queue_low: int = Field(2, ge=0, le=100_000, description="In-flight large-pool calls below which tau falls back.")
    step_nats: float = Field(0.25, gt=0, le=5, description="Change of tau per adjustment.")
    max_offset_nats: float = Field(2.0, gt=0, le=10, description="Most tau may rise above the request's own tau.")
    interval_s: float = Field(1.0, gt=0, le=60, description="Seconds between adjustments.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> TauControllerSettings:
        if self.queue_low >= self.queue_high:
            raise ValueError("queue_low must be below queue_high")
        return self


class FairnessSettings(StrictModel):
    """Fair shares at the step boundary (router/fairness.py): while a pool has more of this replica's calls in
    flight than its concurrency, further glimpses and steps wait and are released by class, then by each
    tenant's virtual token counter (tokens served / weight). Off by default: calls go first come, first served."""

    enabled: bool = Field(False, description="Queue calls beyond each pool's concurrency and release them fairly.")
    max_in_flight_small: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Small-pool calls this router replica keeps in flight at once; more wait in the fair queue.",
    )
    max_in_flight_large: int = Field(
        16,
        ge=1,
        le=100_000,
        description="Large-pool calls this router replica keeps in flight at once; more wait in the fair queue.",
    )
    max_queue_depth: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Waiting calls (both pools) at which admission "
        "refuses even interactive requests (503 with Retry-After); admitted requests' "
        "calls always queue.",
    )
    refuse_batch_at: float = Field(
        0.5, gt=0, le=1, description="Fraction of max_queue_depth at which batch requests are refused."
    )
    refuse_standard_at: float = Field(
        0.75, gt=0, le=1, description="Fraction of max_queue_depth at which standard requests are refused."
    )
    class_aging_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="A waiting call moves up one class for each of these seconds it waits, so no class starves.",
    )
    prefill_token_cost: float = Field(
        0.5,
        ge=0,
        le=10,
        description="What a prompt token not served from the prefix "
        "cache counts in the virtual token counter, next to 1 for an output token.",
    )

    engine_priority: bool = Field(
        False,
        description="Also give each call its place in the order as vLLM's request priority (class, then the "
        "tenant's counter), so an engine that queues calls orders them the same way; the pools' engines need "
        "scheduling_policy: priority. Only matters when the pools queue calls: max_in_flight above max_num_seqs.",
    )

    @model_validator(mode="after")
    def _classes_ordered(self) -> FairnessSettings:
        if self.refuse_batch_at > self.refuse_standard_at:
            raise ValueError("refuse_batch_at must not exceed refuse_standard_at (lowest class refused first)")
        return self

    def max_in_flight(self, pool: PoolRole) -> int:
        """The concurrency of ``pool``."""
        return self.max_in_flight_large if pool == "large" else self.max_in_flight_small


class LargeStepBudgetSettings(StrictModel):
    """How the router holds a `max_large_fraction` (router_service/budgets.py)."""

    window: int = Field(
        200, ge=10, le=100_000, description="Recent glimpse entropies of a tenant whose quantile gives its tau."
    )
    min_samples: int = Field(
        10, ge=1, le=100_000, description="Glimpses seen before the quantile replaces the request's own tau."
    )
    feedback_steps: float = Field(
        4.0,
        gt=0,
        le=10_000,
        description="Steps over which a shortfall or excess of large steps is made up (the share's error feedback).",
    )


class RouterSettings(StrictModel):
    """The router deployment and HTTP API."""

    num_replicas: int = Field(1, ge=1, le=256, description="Router replicas (stateless; state lives in Redis).")
    max_ongoing_requests: int = Field(256, ge=1, le=100_000, description="Requests one router replica runs at once.")
    num_cpus: float = Field(0.5, ge=0, le=64, description="CPUs per router replica.")
    host: str = Field("127.0.0.1", description="HTTP host of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65_535, description="HTTP port of the Serve proxy.")
    prefix_affinity: bool = Field(True, description="Send all of a request's calls to a pool to the same replica.")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576, description="Largest request body (413 beyond).")
    lease_s: float = Field(
        30.0, ge=1, le=3600, description="A request's owner lease; expired leases may be resumed elsewhere."
    )
    policy: PolicySettings = Field(default_factory=PolicySettings, description="Default routing policy.")
    steps: StepSettings = Field(default_factory=StepSettings, description="Step loop constants.")
    tau_controller: TauControllerSettings = Field(default_factory=TauControllerSettings, description="Load-aware tau.")
    fairness: FairnessSettings = Field(default_factory=FairnessSettings, description="Fair shares under saturation.")
    large_step_budget: LargeStepBudgetSettings = Field(
        default_factory=LargeStepBudgetSettings, description="How large-step budgets are held."
    )


class ClusterConfig(StrictModel):
    """The whole system."""

    name: str = Field("glimprouter", pattern=r"^[a-z][a-z0-9\-]{0,40}$", description="Serve application name.")
    pools: PoolsSettings = Field(description="The two model pools.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis connection.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Router and API.")

    @model_validator(mode="after")
    def _engines_order_by_priority(self) -> ClusterConfig:
        fair = self.router.fairness
        fcfs = [role for role, pool in self.pools.items() if pool.engine.scheduling_policy != "priority"]
        if fair.enabled and fair.engine_priority and fcfs:
            raise ValueError(
                f"router.fairness.engine_priority needs pools.<role>.engine.scheduling_policy: priority ({fcfs} not)"
            )
        return self

    @model_validator(mode="after")
    def _steps_fit_context(self) -> ClusterConfig:
        shortest = min(self.pools.small.engine.max_model_len, self.pools.large.engine.max_model_len)
        if self.router.steps.step_max_tokens >= shortest:
            raise ValueError("router.steps.step_max_tokens must be below every pool's engine.max_model_len")
        return self


class ConfigError(ValueError):
    """A config file is missing, not YAML, or invalid; the message names each bad field."""


def set_fields(data: dict, changes: dict) -> dict:
    """``data`` (a config as plain data) with each ``{dotted.path: value}`` of ``changes`` set."""
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``dotted.field.path: message``."""
    lines = []
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"{path}: {item['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path) -> ClusterConfig:
    """Load and validate a YAML config; a bare name (``local``) means a shipped config."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid config\n{format_validation_error(exc)}") from exc
