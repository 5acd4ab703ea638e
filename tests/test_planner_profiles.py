"""The profile fitter (cluster/ops/planner/profiles.py) on synthetic points, the sweep format, and the committed
files."""

from __future__ import annotations

import json
import random

import pytest

from cluster.ops.planner import overheads, profiles

TRUE = {"base_ms": 9.0, "per_seq_ms": 0.05, "per_prefill_token_ms": 0.03, "per_kilo_context_ms": 0.08, "mixed_ms": 2.0}


def synthetic(n: int = 40, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Sweep rows drawn from ``TRUE``; each row's context is each sequence's, as the engine sweep writes it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seqs, prefill = rng.randint(1, 128), rng.choice([0, 0, rng.randint(16, 2048)])
        context = rng.randint(200, 4000)
        ms = (
            TRUE["base_ms"]
            + TRUE["per_seq_ms"] * seqs
            + TRUE["per_prefill_token_ms"] * prefill
            + TRUE["per_kilo_context_ms"] * seqs * context / 1000
            + (TRUE["mixed_ms"] if prefill else 0.0)
        )
        row = {"model": "qwen2.5-14b", "shared": False, "decode_seqs": seqs, "prefill_tokens": prefill}
        rows.append({**row, "context_tokens": context, "iter_ms": ms * (1 + rng.gauss(0, noise))})
    return rows


def as_points(rows: list[dict]) -> list[tuple]:
    return [
        (r["decode_seqs"], r["prefill_tokens"], r["decode_seqs"] * r["context_tokens"], r["iter_ms"], "x") for r in rows
    ]


def test_fit_recovers_a_synthetic_profile():
    points = as_points(synthetic())
    coef, rms, worst = profiles.fit_coefficients(points)
    for term, value in TRUE.items():
        assert getattr(coef, term) == pytest.approx(value, rel=0.05), term
    assert rms < 0.05 and worst < 0.01


def test_fit_with_noise_stays_close():
    points = as_points(synthetic(200, noise=0.03))
    coef, _, _ = profiles.fit_coefficients(points)
    assert coef.base_ms == pytest.approx(TRUE["base_ms"], rel=0.1)
    assert coef.per_prefill_token_ms == pytest.approx(TRUE["per_prefill_token_ms"], rel=0.1)


def test_nonnegative_fit_drops_a_negative_term():
    import numpy as np

    x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    y = np.array([5.0, 4.0, 3.0])  # falls with the second column: least squares would give it -1
    coef = profiles.nonnegative_lstsq(x, y)
    assert coef[1] == 0 and coef[0] == pytest.approx(4.0)


def test_sweep_file_makes_a_profile_and_a_sharing_factor(tmp_path):
    alone = synthetic(30)
    shared = [{**r, "shared": True, "iter_ms": r["iter_ms"] * 1.6} for r in alone[:10]]  # the same batches, beside
    sweep = tmp_path / "engine-sweep-h200.json"
    sweep.write_text(json.dumps({"gpu": "NVIDIA H200", "rows": alone + shared}))
    empty = tmp_path / "docs"
    empty.mkdir()
    assert profiles.fit_all(empty, [sweep]) == []  # a sweep's own times join the fit only when asked
    (fitted,) = profiles.fit_all(empty, [sweep], sweep_times=True)
    assert (fitted.model, fitted.gpu) == ("qwen2.5-14b", "NVIDIA H200")
    assert fitted.coefficients.base_ms == pytest.approx(TRUE["base_ms"], rel=0.05)
    assert fitted.shared_slowdown == pytest.approx(1.6)
    assert fitted.iteration_ms(30, 0, 30_000) == pytest.approx(9.0 + 1.5 + 2.4, rel=0.05)
    assert fitted.iteration_ms(30, 100, 30_000) == pytest.approx(9.0 + 1.5 + 2.4 + 3.0 + 2.0, rel=0.05)


def test_sweep_leaves_out_mps_rows_and_small_prefill_past_the_graphs(tmp_path):
    rows = [
        {
            "model": "qwen2.5-1.5b",
            "shared": False,
            "decode_seqs": 32,
            "prefill_tokens": p,
            "context_tokens": 2000,
            "iter_ms": 5.0,
            "mps": mps,
        }
        for p, mps in ((0, False), (256, False), (1024, False), (0, True))
    ]
    sweep = tmp_path / "engine-sweep-h200.json"
    sweep.write_text(json.dumps({"versions": {"gpu": "NVIDIA H200"}, "rows": rows}))
    (points,) = profiles.sweep_points(sweep).values()
    assert [(p[1], p[2]) for p in points] == [(0, 64_000), (256, 64_000)]


def test_sweep_as_a_bare_list_takes_the_card_from_its_name(tmp_path):
    sweep = tmp_path / "engine-sweep-h100.json"
    sweep.write_text(json.dumps(synthetic(10)))
    (key,) = profiles.sweep_points(sweep)
    assert key == ("qwen2.5-14b", "NVIDIA H100 80GB HBM3", "default", False)


def test_committed_profiles_are_what_the_fit_gives():
    """cluster/ops/planner/profiles/*.json are the fit of the committed runs (rerun `profiles fit` after a new run)."""
    committed = profiles.load_profiles()
    fresh = {p.key: p for p in profiles.fit_all()}
    assert set(committed) == set(fresh)
    for key, profile in fresh.items():
        assert committed[key].model_dump() == profile.model_dump(), key


def test_committed_overheads_are_what_the_fit_gives():
    saved = json.loads(overheads.OVERHEADS_FILE.read_text())
    for kind, fitted in overheads.fit_overheads().items():
        assert saved[kind] == fitted, kind
