"""The load-aware tau controller: rises while the large pool's queue is long, falls back as it drains; the
lowest class with running requests first, the highest class restored first."""

import pytest

from cluster.config import PolicySettings, TauControllerSettings
from router_service.tau_control import TauController

STANDARD = {"standard"}


def controller(**over) -> TauController:
    return TauController(
        TauControllerSettings(enabled=True, queue_high=4, queue_low=1, step_nats=0.5, max_offset_nats=1.0, **over)
    )


def test_rises_above_high_water_up_to_the_cap_then_falls_back_below_low_water():
    c = controller()
    assert [c.update(q, STANDARD) for q in (5, 9, 9, 3, 0, 0, 0)] == ["up", "up", None, None, "down", "down", None]
    assert c.offset == 0.0


def test_queue_between_the_marks_holds_the_offset():
    c = controller()
    c.update(10, STANDARD)
    assert [c.update(q, STANDARD) for q in (1, 2, 4)] == [None, None, None]
    assert c.offsets["standard"] == 0.5


def test_apply_adds_the_offset_and_clamps_to_the_tenant_bounds():
    c = controller()
    c.update(10, STANDARD), c.update(10, STANDARD)
    policy = PolicySettings(policy="glimprouter", tau=1.0)
    assert c.apply(policy, None, None).tau == pytest.approx(2.0)
    assert c.apply(policy, None, 1.6).tau == pytest.approx(1.6)
    c.offsets["standard"] = 0.0
    assert c.apply(policy, 1.3, None).tau == pytest.approx(1.3)
    assert c.apply(policy, None, None) is policy


def test_the_lowest_class_is_raised_first_and_the_highest_restored_first():
    c = controller()
    for _ in range(5):
        c.update(10)
    assert c.offsets == {"batch": 1.0, "standard": 1.0, "interactive": 0.5}
    policy = PolicySettings(policy="glimprouter", tau=1.0)
    taus = {cls: c.apply(policy, None, None, cls).tau for cls in ("interactive", "standard", "batch")}
    assert taus == {"interactive": 1.5, "standard": 2.0, "batch": 2.0}
    c.update(0), c.update(0)
    assert c.offsets == {"batch": 1.0, "standard": 0.5, "interactive": 0.0}


def test_only_classes_with_running_requests_are_raised():
    c = controller()
    assert c.update(10, {"interactive", "standard"}) == "up"
    assert c.offsets == {"batch": 0.0, "standard": 0.5, "interactive": 0.0}  # no batch traffic: standard moves
    assert c.update(10, set()) is None


def test_apply_leaves_other_policies_alone():
    c = controller()
    c.update(10, STANDARD)
    policy = PolicySettings(policy="random", tau=1.0)
    assert c.apply(policy, None, None) is policy


def test_marks_must_be_ordered():
    with pytest.raises(ValueError, match="queue_low"):
        TauControllerSettings(queue_high=2, queue_low=2)
