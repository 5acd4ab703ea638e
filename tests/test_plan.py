"""``python -m cluster plan`` and ``predict`` on the performance model: output, JSON, and input errors."""

from __future__ import annotations

import json

import pytest

from cluster.ops.cli import main
from cluster.ops.plan import fraction_at_tau

SHAPE = ["--steps", "4", "--step-tokens", "32", "--final-tokens", "16"]
PLAN = ["plan", "--rate", "1", *SHAPE, "--p95", "20", "--max-cell-gpus", "1", "--duration", "40"]
PREDICT = ["predict", "--layout", "s,l", *SHAPE]


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"taus": [0.5, 1.0, 2.0], "large_fraction": [0.6, 0.3, 0.1]}))
    return path


def run(argv: list[str]) -> int:
    """Exit status of the CLI, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_fraction_interpolates_and_clamps():
    taus, fractions = [0.5, 1.0, 2.0], [0.6, 0.3, 0.1]
    assert fraction_at_tau(0.75, taus, fractions) == pytest.approx(0.45)
    assert fraction_at_tau(1.5, taus, fractions) == pytest.approx(0.2)
    assert fraction_at_tau(1.0, taus, fractions) == 0.3
    assert fraction_at_tau(0.0, taus, fractions) == 0.6
    assert fraction_at_tau(9.0, taus, fractions) == 0.1


def test_plan_table_names_the_cheapest_and_large_only(capsys):
    assert main([*PLAN, "--large-fraction", "0.25", "--config", "local"]) == 0
    out = capsys.readouterr().out
    assert "cheapest:" in out and "large only:" in out
    assert ("routing pays" in out) != ("routing does not pay" in out)
    assert "target_ongoing_requests" in out


def test_plan_json_meets_its_target(capsys):
    assert main([*PLAN, "--large-fraction", "0.25", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best = result["best"]
    assert best["p95_s"] <= 20 and best["copies"] * best["capacity"] >= 1
    assert best["gpus"] == best["copies"] * best["gpus_per_copy"]
    assert result["large_only"]["layout"] == "l"
    assert set(result["autoscaling"]) <= {"small", "large"}


def test_plan_in_flight_and_tau(capsys, calibration):
    argv = [
        "plan",
        "--in-flight",
        "8",
        *SHAPE,
        "--p95",
        "20",
        "--max-cell-gpus",
        "1",
        "--tau",
        "1.5",
        "--calibration",
        str(calibration),
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["large_fraction"] == pytest.approx(0.2) and result["unit"] == "in flight"


def test_plan_unreachable_target_exits_1(capsys):
    assert (
        main([*PLAN[:-4], "--p95", "0.01", "--max-cell-gpus", "1", "--duration", "30", "--large-fraction", "0.25"]) == 1
    )
    assert "no cell meets the target" in capsys.readouterr().out


def test_plan_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main([*PLAN, "--large-fraction", "0.25", "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_predict_closed_and_open(capsys):
    assert main([*PREDICT, "--large-fraction", "0.25", "--in-flight", "4"]) == 0
    out = capsys.readouterr().out
    assert "closed loop, 4 in flight, 8 requests" in out and "small " in out and "large " in out
    assert main([*PREDICT, "--large-fraction", "0.25", "--rate", "0.5", "--duration", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["throughput_rps"] > 0 and result["p95_s"] >= result["p50_s"]


def test_predict_large_only_layout_runs_the_large_policy(capsys):
    assert main(["predict", "--layout", "2xl", *SHAPE, "--large-fraction", "0.25", "--in-flight", "2", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["pools"]) == {"large"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*PLAN[:2], "-1", *PLAN[3:], "--large-fraction", "0.2"], "argument --rate: must be > 0"),
        ([*PLAN, "--large-fraction", "1.5"], "argument --large-fraction: must be >= 0 and <= 1"),
        ([*PLAN, "--tau", "1.0"], "--tau needs --calibration"),
        ([*PLAN, "--large-fraction", "0.2", "--tau", "1.0"], "not allowed with argument"),
        ([*PLAN, "--large-fraction", "0.2", "--goodput", "0.9"], "--goodput and --bound go together"),
        ([*PREDICT[:2], "s+x", *SHAPE, "--large-fraction", "0.2", "--rate", "1"], "roles are s (small)"),
        ([*PREDICT[:2], "2xs", *SHAPE, "--large-fraction", "0.2", "--rate", "1"], "no large replica"),
    ],
)
def test_cli_bad_input(capsys, args, message):
    assert run(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "expected JSON"),
        ('{"taus": [1, 2]}', "expected JSON"),
        ('{"taus": [2, 1], "large_fraction": [0.3, 0.2]}', "strictly increasing"),
        ('{"taus": [1], "large_fraction": [0.3]}', "at least 2"),
        ('{"taus": [1, 2], "large_fraction": [0.3, 1.2]}', "[0, 1]"),
    ],
)
def test_cli_bad_calibration(tmp_path, capsys, content, message):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    assert main([*PREDICT, "--in-flight", "1", "--tau", "1.0", "--calibration", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_calibration(tmp_path, capsys):
    assert main([*PREDICT, "--in-flight", "1", "--tau", "1.0", "--calibration", str(tmp_path / "nope.json")]) == 2
    assert "cannot read calibration" in capsys.readouterr().err
