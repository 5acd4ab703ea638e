"""The load-aware tau controller: rises while the large pool's queue is long, falls back as it drains."""

import pytest

from cluster.config import PolicySettings, TauControllerSettings
from router_service.tau_control import TauController


def controller(**over) -> TauController:
    return TauController(
        TauControllerSettings(enabled=True, queue_high=4, queue_low=1, step_nats=0.5, max_offset_nats=1.0, **over)
    )


def test_rises_above_high_water_up_to_the_cap_then_falls_back_below_low_water():
    c = controller()
    assert [c.update(q) for q in (5, 9, 9, 3, 0, 0, 0)] == ["up", "up", None, None, "down", "down", None]
    assert c.offset == 0.0


def test_queue_between_the_marks_holds_the_offset():
    c = controller()
    c.update(10)
    assert [c.update(q) for q in (1, 2, 4)] == [None, None, None]
    assert c.offset == 0.5


def test_apply_adds_the_offset_and_clamps_to_the_tenant_bounds():
    c = controller()
    c.update(10), c.update(10)
    policy = PolicySettings(policy="glimprouter", tau=1.0)
    assert c.apply(policy, None, None).tau == pytest.approx(2.0)
    assert c.apply(policy, None, 1.6).tau == pytest.approx(1.6)
    c.offset = 0.0
    assert c.apply(policy, 1.3, None).tau == pytest.approx(1.3)
    assert c.apply(policy, None, None) is policy


def test_apply_leaves_other_policies_alone():
    c = controller()
    c.update(10)
    policy = PolicySettings(policy="random", tau=1.0)
    assert c.apply(policy, None, None) is policy


def test_marks_must_be_ordered():
    with pytest.raises(ValueError, match="queue_low"):
        TauControllerSettings(queue_high=2, queue_low=2)
