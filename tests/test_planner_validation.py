"""docs/planning.md's validation table is what the simulator predicts today for every committed GPU run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.ops.planner import validate

DOC = Path(__file__).resolve().parents[1] / "docs" / "planning.md"


@pytest.fixture(scope="module")
def rows() -> list[validate.Row]:
    return validate.all_rows()


def test_doc_table_equals_the_recomputed_one(rows):
    recomputed = validate.document(rows, validate.held_out_rows())
    assert validate.doc_table(DOC) == recomputed, (
        "rerun: python -m cluster.ops.planner.validate --write docs/planning.md"
    )


def test_every_committed_run_has_rows(rows):
    files = {(r.run, r.file) for r in rows}
    assert files == {(validate.run_folder(p), p.name) for p in validate.measured_files()}
    assert {r.gpu for r in rows} == {validate.H100, "NVIDIA H200"}


def test_the_table_ends_with_the_worst_errors(rows):
    table = validate.table(rows)
    last = table.splitlines()[-1]
    worst = max(abs(r.error("throughput_rps")) for r in rows)
    assert last == validate.worst_line(rows) and last.startswith(f"worst throughput error: {worst:.1%}, worst p95 ")
