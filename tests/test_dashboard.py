"""The Grafana dashboard: the committed JSON is fresh and covers every metric of cluster.metrics."""

from __future__ import annotations

import json
import re

from cluster.metrics import SPECS
from cluster.ops.dashboard import OUTPUT, dashboard

BOARD = dashboard()
TARGETS = [t for p in BOARD["panels"] for t in p["targets"]]


def test_committed_file_is_fresh():
    assert json.loads(OUTPUT.read_text()) == BOARD, "stale: run `python -m cluster.ops.dashboard`"


def test_every_metric_has_a_panel():
    exprs = "\n".join(t["expr"] for t in TARGETS)
    missing = [s.exported for s in SPECS.values() if not re.search(rf"\b{s.exported}(_total|_bucket)?\b", exprs)]
    assert missing == []


def test_panel_ids_unique():
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_targets_use_datasource_variable():
    assert BOARD["schemaVersion"] == 39
    assert [v["name"] for v in BOARD["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in TARGETS)
    assert all(t["expr"] and t["refId"] for t in TARGETS)
