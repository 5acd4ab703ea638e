"""Capacity planning (``python -m cluster plan``): the formulas by hand, and the CLI."""

from __future__ import annotations

import json

import pytest

from cluster.ops.cli import main
from cluster.ops.plan import fraction_at_tau, pool_demand, replicas_needed

BASE = ["plan", "--rate", "2", "--steps", "10", "--step-tokens", "100", "--final-tokens", "50",
        "--small-tps", "500", "--large-tps", "100"]


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


def test_pool_demand_by_hand():
    # small: 2*10*((1-0.25)*100 + 1) = 1520; large: 2*(10*0.25*100 + 50) = 600
    assert pool_demand(2, 10, 100, 50, 0.25) == {"small": 1520, "large": 600}
    assert pool_demand(2, 10, 100, 50, 0.25, glimpse_cost=3) == {"small": 1560, "large": 600}
    assert pool_demand(1, 4, 50, 20, 1.0, glimpse_cost=0) == {"small": 0, "large": 220}


def test_fraction_interpolates_and_clamps():
    taus, fractions = [0.5, 1.0, 2.0], [0.6, 0.3, 0.1]
    assert fraction_at_tau(0.75, taus, fractions) == pytest.approx(0.45)
    assert fraction_at_tau(1.5, taus, fractions) == pytest.approx(0.2)
    assert fraction_at_tau(1.0, taus, fractions) == 0.3
    assert fraction_at_tau(0.0, taus, fractions) == 0.6
    assert fraction_at_tau(9.0, taus, fractions) == 0.1


def test_replicas_ceil_and_at_least_one():
    assert replicas_needed(1520, 500, 0.7) == 5  # 1520 / 350 = 4.34
    assert replicas_needed(600, 100, 0.7) == 9  # 600 / 70 = 8.57
    assert replicas_needed(210, 100, 0.7) == 3  # exactly 3, no float overshoot to 4
    assert replicas_needed(0, 100, 0.7) == 1
    assert replicas_needed(1, 1000, 1.0) == 1


def test_cli_table(capsys):
    assert main([*BASE, "--large-fraction", "0.25", "--config", "local"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[0] in ("small", "large")}
    assert rows["small"] == ["small", "1520.0", "500.0", "5", "1", "2"]
    assert rows["large"] == ["large", "600.0", "100.0", "9", "1", "1"]
    assert "ceil(demand" in out
    assert "large pool needs 9 replicas" in err and "max_replicas = 1" in err


def test_cli_json_with_tau(capsys, calibration):
    assert main([*BASE, "--tau", "1.5", "--calibration", str(calibration), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["large_fraction"] == pytest.approx(0.2)
    assert result["pools"]["small"]["demand_tps"] == pytest.approx(2 * 10 * (80 + 1))
    assert result["pools"]["large"] == {"demand_tps": pytest.approx(2 * (200 + 50)), "replica_tps": 100, "replicas": 8}


def test_cli_plot_writes_png(tmp_path, calibration, capsys):
    png = tmp_path / "plan.png"
    assert main([*BASE, "--tau", "1.0", "--calibration", str(calibration), "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(("args", "message"), [
    (["--rate", "-1", "--large-fraction", "0.2"], "argument --rate: must be > 0"),
    (["--large-fraction", "1.5"], "argument --large-fraction: must be >= 0 and <= 1"),
    (["--utilization", "0", "--large-fraction", "0.2"], "argument --utilization: must be > 0"),
    (["--tau", "1.0"], "--tau and --plot need --calibration"),
    (["--large-fraction", "0.2", "--tau", "1.0"], "not allowed with argument"),
])
def test_cli_bad_input(capsys, args, message):
    assert run([*BASE, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "expected JSON"),
    ('{"taus": [1, 2]}', "expected JSON"),
    ('{"taus": [2, 1], "large_fraction": [0.3, 0.2]}', "strictly increasing"),
    ('{"taus": [1], "large_fraction": [0.3]}', "at least 2"),
    ('{"taus": [1, 2], "large_fraction": [0.3, 1.2]}', "[0, 1]"),
])
def test_cli_bad_calibration(tmp_path, capsys, content, message):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    assert main([*BASE, "--tau", "1.0", "--calibration", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_calibration(tmp_path, capsys):
    assert main([*BASE, "--tau", "1.0", "--calibration", str(tmp_path / "nope.json")]) == 2
    assert "cannot read calibration" in capsys.readouterr().err
