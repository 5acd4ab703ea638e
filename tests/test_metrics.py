"""The router's sliding large-step fraction."""

from collections import deque
from unittest import mock

from cluster import metrics


def test_large_fraction_is_the_share_of_large_steps_in_the_last_window():
    with mock.patch.object(metrics, "set_gauge") as gauge:
        fraction, window = metrics.LargeFraction(window=3), deque(maxlen=3)
        for pool in ["large", "small", "large", "large", "small", "small", "small", "large"]:
            window.append(pool == "large")
            assert fraction.record(pool) == sum(window) / len(window)
    gauge.assert_called_with("glimprouter_large_step_fraction", 1 / 3)
