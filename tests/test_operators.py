"""The operators' commands' pure parts: Prometheus histogram quantiles, the scaled Serve config, calibration."""

import math

import pytest

from cluster.ops.operators import delta, fractions, quantile, scaled_config, tau_for_fraction, total


def hist(name: str, pool: str, counts: dict[float, float]) -> dict:
    return {(f"{name}_bucket", frozenset({("pool", pool), ("le", str(le))})): c for le, c in counts.items()}


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    samples = hist("h", "small", {0.1: 10, 0.2: 30, 0.5: 40, math.inf: 40})
    assert quantile(samples, "h", 0.5, pool="small") == pytest.approx(0.15)  # rank 20: halfway in (0.1, 0.2]
    assert quantile(samples, "h", 0.95, pool="small") == pytest.approx(0.2 + 0.3 * (38 - 30) / 10)
    assert quantile(samples, "h", 0.5, pool="large") is None


def test_quantile_in_the_overflow_bucket_is_the_last_finite_bound():
    samples = hist("h", "large", {1.0: 1, math.inf: 10})
    assert quantile(samples, "h", 0.9, pool="large") == 1.0


def test_delta_and_total_over_labels():
    before = {("c", frozenset({("pool", "small"), ("tenant", "a")})): 3.0}
    after = {
        ("c", frozenset({("pool", "small"), ("tenant", "a")})): 5.0,
        ("c", frozenset({("pool", "small"), ("tenant", "b")})): 4.0,
        ("c", frozenset({("pool", "large"), ("tenant", "b")})): 1.0,
    }
    moved = delta(after, before)
    assert total(moved, "c", pool="small") == 6.0
    assert total(moved, "c") == 7.0


DETAILS = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": {
        "glimprouter": {
            "deployed_app_config": {
                "name": "glimprouter",
                "import_path": "cluster.ops.builder:app_builder",
                "args": {"config": {"x": 1}},
                "deployments": [
                    {
                        "name": "SmallPool",
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
                    },
                    {
                        "name": "LargePool",
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
                    },
                    {"name": "Router", "num_replicas": 1},
                ],
            }
        }
    },
}


def test_scaled_config_changes_only_that_pools_autoscaling():
    config = scaled_config(DETAILS, "glimprouter", "small", {"max_replicas": 4, "target_ongoing_requests": 2})
    app = config["applications"][0]
    small, large, router = app["deployments"]
    assert small["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert large == {
        "name": "LargePool",
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
    }
    assert (
        DETAILS["applications"]["glimprouter"]["deployed_app_config"]["deployments"][0]["autoscaling_config"][
            "max_replicas"
        ]
        == 2
    )  # the details read are left as they were
    assert router == {"name": "Router", "num_replicas": 1}
    assert app["args"] == {"config": {"x": 1}}  # args unchanged: Serve keeps the replicas


def test_scaled_config_rejects_min_above_max():
    with pytest.raises(ValueError, match="above max_replicas"):
        scaled_config(DETAILS, "glimprouter", "large", {"min_replicas": 3})


def test_calibration_fractions_and_tau_choice():
    entropies = [0.1, 0.5, 0.9, 1.2, 2.0]
    taus = [0.0, 0.5, 1.0, 1.5, 2.5]
    fracs = fractions(entropies, taus)
    assert fracs == [1.0, 0.8, 0.4, 0.2, 0.0]
    assert tau_for_fraction(taus, fracs, 0.25) == 1.5
