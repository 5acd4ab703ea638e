"""The Grafana dashboard of the system, built from the metric names of ``cluster.metrics``.

``python -m cluster.ops.dashboard`` writes it to ``cluster/grafana-dashboard.json`` (committed; import it in
Grafana and pick the Prometheus data source that scrapes the Ray nodes). tests/test_dashboard.py checks
that the file is fresh and that every metric of ``SPECS`` has a panel.
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.metrics import SPECS

OUTPUT = Path(__file__).parents[1] / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WINDOW = "[$__rate_interval]"
# vLLM's Ray stat logger replaces ':' by '_' in its names (vllm:num_requests_waiting -> vllm_num_requests_waiting).
VLLM_WAITING = "ray_vllm_num_requests_waiting"
VLLM_CACHE_HITS = "ray_vllm_prefix_cache_hits_total"
VLLM_CACHE_QUERIES = "ray_vllm_prefix_cache_queries_total"


def series(name: str) -> str:
    """The scraped series of metric ``name`` of ``SPECS`` (histograms: add ``_bucket``)."""
    return SPECS[name].exported


def rate(name: str, by: str) -> str:
    """Per-second rate of a counter of ``SPECS``, summed by the labels ``by``."""
    return f"sum by ({by}) (rate({series(name)}{WINDOW}))"


def quantile(q: float, name: str, by: str = "") -> str:
    """The ``q`` quantile of a histogram of ``SPECS``, per label set ``by``."""
    labels = ", ".join(["le", by]) if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({series(name)}_bucket{WINDOW})))"


def latency_targets(name: str, by: str = "", what: str = "") -> list[tuple[str, str]]:
    """p50 and p95 targets of a latency histogram, labelled ``p50 <what> {{by}}``."""
    legend = " ".join(filter(None, [what, f"{{{{{by}}}}}" if by else ""]))
    return [(quantile(q, name, by), f"p{round(q * 100)} {legend}".strip()) for q in (0.5, 0.95)]


def panel(
    title: str, unit: str, targets: list[tuple[str, str]], description: str = "", kind: str = "timeseries", **extra
) -> dict:
    """A panel of ``(expr, legend)`` targets, each on the ``datasource`` variable."""
    fmt = {"format": "heatmap"} if kind == "heatmap" else {}  # Prometheus buckets as heatmap cells
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i), **fmt}
            for i, (expr, legend) in enumerate(targets)
        ],
        **extra,
    }


def panels() -> list[dict]:
    """Every panel, in reading order (two per row)."""
    steps = series("glimprouter_steps")
    return [
        panel("Requests/s by outcome", "reqps", [(rate("glimprouter_requests", "outcome"), "{{outcome}}")]),
        panel("Request latency by policy", "s", latency_targets("glimprouter_request_latency_seconds", "policy")),
        panel(
            "Time to first output (request)",
            "s",
            latency_targets("glimprouter_request_ttft_seconds", "stream", "first output"),
        ),
        panel(
            "Refused by a limit (429) by tenant and limit",
            "short",
            [
                (
                    f"sum by (tenant, reason) (increase({series('glimprouter_rejections')}{WINDOW}))",
                    "{{tenant}} {{reason}}",
                )
            ],
        ),
        panel(
            "Steps and glimpses/s",
            "ops",
            [
                (f"sum by (pool) (rate({steps}{WINDOW}))", "steps {{pool}}"),
                (f"sum(rate({series('glimprouter_glimpses')}{WINDOW}))", "glimpses"),
            ],
        ),
        panel(
            "Large-step fraction",
            "percentunit",
            [
                (f"avg({series('glimprouter_large_step_fraction')})", "last 200 steps, mean of routers"),
                (f'sum(rate({steps}{{pool="large"}}{WINDOW})) / sum(rate({steps}{WINDOW}))', "from step counts"),
            ],
            "Share of reasoning steps the large pool writes; the GlimpRouter paper advises 20-30%.",
        ),
        panel(
            "First-token entropy (nats)",
            "short",
            [(f"sum by (le) (increase({series('glimprouter_first_token_entropy_nats')}_bucket{WINDOW}))", "{{le}}")],
            "Glimpses per entropy bucket; steps at or above tau go to the large pool.",
            kind="heatmap",
            options={"calculate": False, "yAxis": {"unit": "short"}},
        ),
        panel(
            "Glimpse and step latency by pool",
            "s",
            latency_targets("glimprouter_glimpse_latency_seconds", what="glimpse")
            + latency_targets("glimprouter_step_latency_seconds", "pool", "step"),
        ),
        panel("Redis latency p95 by op", "s", [(quantile(0.95, "glimprouter_redis_latency_seconds", "op"), "{{op}}")]),
        panel(
            "Pool ongoing requests and queue depth",
            "short",
            [
                (f"sum by (pool) ({series('glimprouter_pool_ongoing_requests')})", "ongoing {{pool}}"),
                (f"sum by (pool) ({series('glimprouter_pool_queue_depth')})", "queued {{pool}}"),
                (f"sum by (pool) ({series('glimprouter_fair_queue_depth')})", "router fair queue {{pool}}"),
            ],
        ),
        panel(
            "Engine iterations/s, tokens per iteration and busy engines by pool",
            "short",
            [
                (rate("glimprouter_engine_iterations", "pool"), "iterations/s {{pool}}"),
                (
                    f"{rate('glimprouter_engine_tokens', 'pool, kind')} / ignoring(kind) group_left "
                    f"{rate('glimprouter_engine_iterations', 'pool')}",
                    "{{kind}} tokens/iteration {{pool}}",
                ),
                (rate("glimprouter_engine_busy_seconds", "pool"), "busy engines {{pool}}"),
            ],
            "Scheduler iterations per second, the decode (batch) and prefill tokens each iteration computed, and "
            "how many of the pool's engines were iterating (busy seconds per second).",
        ),
        panel(
            "Engine request time by pool, call and part",
            "s",
            [
                (
                    f"{rate('glimprouter_engine_request_seconds', 'pool, call, part')} / ignoring(part) group_left "
                    f"{rate('glimprouter_engine_requests', 'pool, call')}",
                    "{{part}} {{call}} {{pool}}",
                )
            ],
            "Mean time of an engine request (glimpse or generate) that ran to its end: queued, running (first "
            "scheduled to last token) and total (arrival to last output in the engine's front end); the total "
            "less the other two is the way into and out of the engine core.",
        ),
        panel(
            "Tokens/s by tenant and pool",
            "short",
            [
                (rate("glimprouter_tokens", "tenant, pool"), "{{tenant}} {{pool}} output"),
                (rate("glimprouter_prefill_tokens", "tenant, pool"), "{{tenant}} {{pool}} prefilled"),
            ],
            "Output tokens and prompt tokens prefilled (not in the prefix cache): what the fair queue charges "
            "each tenant, prefilled tokens at router.fairness.prefill_token_cost.",
        ),
        panel(
            "Tau offset (nats)",
            "short",
            [
                (f"avg({series('glimprouter_tau_offset_nats')})", "mean of routers"),
                (f"max({series('glimprouter_tau_offset_nats')})", "max of routers"),
            ],
            "What the load-aware controller adds to each request's tau.",
        ),
        panel(
            "Pool calls retried after a replica died",
            "short",
            [(f"sum by (pool) (increase({series('glimprouter_pool_retries')}{WINDOW}))", "{{pool}}")],
        ),
        panel(
            "Tau changes by direction",
            "short",
            [(f"sum by (direction) (increase({series('glimprouter_tau_changes')}{WINDOW}))", "{{direction}}")],
        ),
        panel(
            "Serve replicas by deployment",
            "short",
            [
                ("sum by (application, deployment) (ray_serve_deployment_replica_healthy)", "healthy {{deployment}}"),
                ("max by (application, deployment) (ray_serve_autoscaling_target_replicas)", "target {{deployment}}"),
            ],
        ),
        panel("vLLM requests waiting by model", "short", [(f"sum by (model_name) ({VLLM_WAITING})", "{{model_name}}")]),
        panel(
            "vLLM prefix cache hit rate by model",
            "percentunit",
            [
                (
                    f"sum by (model_name) (rate({VLLM_CACHE_HITS}{WINDOW})) / "
                    f"sum by (model_name) (rate({VLLM_CACHE_QUERIES}{WINDOW}))",
                    "{{model_name}}",
                )
            ],
        ),
    ]


def dashboard() -> dict:
    """The Grafana dashboard (schema 39) with a ``datasource`` variable for the Prometheus data source."""
    laid_out = [
        {**p, "id": i + 1, "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}}
        for i, p in enumerate(panels())
    ]
    return {
        "uid": "glimprouter",
        "title": "GlimpRouter",
        "tags": ["glimprouter", "ray-serve", "vllm"],
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                }
            ]
        },
        "panels": laid_out,
    }


def main() -> None:
    """Write the dashboard to ``cluster/grafana-dashboard.json``."""
    OUTPUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
