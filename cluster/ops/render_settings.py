"""An overlay's ``render.yaml`` (``RenderSettings``): what cluster/ops/render.py renders its RayService from, beside
the config tree: the image, the upgrade strategy, and the pods of the head, the routers and each pool."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config import StrictModel

NODE_POOL_LABEL = "glimprouter.io/node-pool"
HF_CACHE = "/home/ray/.cache/huggingface"
SCRATCH_GIB = 10  # node disk per Ray pod beyond the model cache: Ray's logs and session files, compile caches


class HeadSettings(StrictModel):
    """The head pod: GCS, Serve controller, the head's Serve proxy and the autoscaler; Ray schedules no
    replica there (0 CPUs, 0 GPUs), so the API outlives it."""

    cpu: int = Field(2, ge=1, le=256, description="Container CPUs (GCS, dashboard, Serve controller).")
    memory_gib: int = Field(8, ge=2, le=2048, description="Memory (GiB).")


class RouterGroupSettings(StrictModel):
    """The router pods: CPU only, one Router replica (and its Serve proxy) per pod, on any node without GPUs."""

    memory_gib: int = Field(4, ge=2, le=1024, description="Memory per pod (GiB).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the router pods need.")


class WorkerGroupSettings(StrictModel):
    """One pool's worker pods; each pod holds one Serve replica of the pool."""

    node_pool: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=f"Value of the pool's nodes' {NODE_POOL_LABEL} label (and of their NoSchedule taint).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Further node labels, e.g. the GPU product."
    )
    memory_gib: int = Field(ge=2, le=4096, description="Host memory per pod (GiB), /dev/shm included.")
    shm_gib: int = Field(8, ge=1, le=1024, description="Memory-backed /dev/shm (GiB) for vLLM and NCCL.")
    cache_gib: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Node disk (GiB) for the model cache: each pod downloads the pool's weights "
        f"from the hub into a volume of this size at {HF_CACHE}; the pod requests it (ephemeral-storage) "
        f"with {SCRATCH_GIB} GiB more for Ray's logs, so the scheduler places it on a node with the room.",
    )
    cache_claim: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Instead of cache_gib: a ReadWriteMany "
        f"PersistentVolumeClaim, shared by the pool's pods at {HF_CACHE}, that already holds the pool's model "
        "(docs/kubernetes.md: filling it); its pods then read the weights offline (HF_HUB_OFFLINE=1).",
    )

    @model_validator(mode="after")
    def _sizes_consistent(self) -> WorkerGroupSettings:
        if self.shm_gib >= self.memory_gib:
            raise ValueError("shm_gib must be below memory_gib: /dev/shm counts against the pod's memory")
        if (self.cache_gib is None) == (self.cache_claim is None):
            raise ValueError(
                "set exactly one of cache_gib (a cache on the node's disk) or cache_claim (a shared claim)"
            )
        return self


class RenderSettings(StrictModel):
    """An overlay's ``render.yaml``: what its RayService is rendered from."""

    config: str = Field(description="Config tree: a path relative to render.yaml, or a shipped config's name.")
    image: str = Field(min_length=1, description="Image with Ray, vLLM and this project (k8s/image/Dockerfile).")
    ray_version: str = Field(pattern=r"^\d+\.\d+\.\d+$", description="Ray version in the image.")
    head: HeadSettings = Field(default_factory=HeadSettings, description="The head pod.")
    router: RouterGroupSettings = Field(default_factory=RouterGroupSettings, description="The router pods.")
    upgrade_strategy: Literal["None", "NewCluster"] = Field(
        "None",
        description="RayService upgradeStrategy.type. 'None': a change of rayClusterConfig (image, pod "
        "sizes) waits until the RayCluster is replaced on purpose (docs/kubernetes.md), so the GPUs in use are "
        "never doubled; Serve config changes still apply in place. 'NewCluster' (KubeRay's default): a second "
        "RayCluster at its groups' replicas starts beside the running one and takes the traffic once it serves.",
    )
    small: WorkerGroupSettings = Field(description="The small pool's worker pods.")
    large: WorkerGroupSettings = Field(description="The large pool's worker pods.")
