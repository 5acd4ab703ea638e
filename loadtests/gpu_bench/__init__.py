"""GPU benchmark driver: the whole system (Redis, Ray, both vLLM pools, the router) on a GPU machine, driven
through the HTTP API.

    python -m loadtests.gpu_bench single [--layout one-gpu] [--requests 3] [--set PATH=VALUE ...]
    python -m loadtests.gpu_bench load --layout shared-2gpu --levels stream:1,stream:64,fused:64 [--steps 16] [--mps]
    python -m loadtests.gpu_bench plot results/gpu/load-*.json
    python -m loadtests.gpu_bench compare results/gpu/routed-*.json --baseline results/gpu/large-only-*.json

Settings come from ``cluster/configs/gpu-bench.yaml``; ``--layout`` patches its placement and replicas and
starts local Ray nodes, each owning its GPUs and advertising the pools it hosts (see ``LAYOUTS``: a node per
GPU, and for tensor parallelism one more that owns both); ``--set`` overrides any
field last (a lever under test), and the result file names it. The model folders have
real Qwen2.5 shapes and random weights (``loadtests.gpu_models``), so the routing is forced (see the config)
and every run says so. ``single`` breaks each request's time down from the system's own metrics; ``load``
warms up with one request per slot of its largest level, then runs closed loops at fixed numbers of requests
in flight (``--rounds`` requests per slot), for client arms (``ARMS``: streamed, not streamed, streamed with
fused glimpses or with glimpses in the step calls, and two streamed baselines by request policy: ``random``
routing, which takes no glimpse, and ``large`` only) on one running system; each level records throughput
(over the level, and steady while every slot was busy), latency, TTFT, goodput, steps per request,
prefix-cache hits, each pool's step and glimpse times, and each pool's engine iterations, busy time (both also
by phase: decode-only or mixed with prefill), tokens, and its requests' time queued, running and in all by call
(from the pools' engine counters; the router's mean time of each kind of call beside them). Results go to
``results/gpu/`` as JSON.

The package: ``layouts`` (the layouts as data, overrides), ``system`` (Redis, Ray nodes, MPS), ``client`` (arms,
one timed request), ``stats`` (a level's figures), ``report`` (result files, plot, compare), ``cli``.
"""

from __future__ import annotations
