"""The load tests read keys as the README's recipe writes them: ``tenants create --json`` output, or one a line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtests.keys import api_keys, parse_keys

KEY_A, KEY_B = "gr-0123abcd-" + "a" * 43, "gr-89abcdef-" + "b" * 43


def created(key: str, tenant: str = "team-a") -> str:
    """What ``python -m cluster tenants create NAME --json`` prints."""
    return json.dumps({"tenant": tenant, "key": key, "prefix": key[:11]}, indent=2) + "\n"


def test_keys_from_tenants_create_json_appended_twice():
    assert parse_keys(created(KEY_A) + created(KEY_B, "team-b")) == [KEY_A, KEY_B]


def test_keys_one_a_line_and_json_lists():
    assert parse_keys(f"{KEY_A}\n\n  {KEY_B}\n") == [KEY_A, KEY_B]
    assert parse_keys(json.dumps([KEY_A, {"key": KEY_B}])) == [KEY_A, KEY_B]


def test_json_without_a_key_is_refused():
    with pytest.raises(ValueError, match="no API key"):
        parse_keys('{"tenant": "team-a"}')


def test_env_keys_win_over_the_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(created(KEY_A))
    assert api_keys({"GLIMP_KEYS_FILE": str(path)}) == [KEY_A]
    assert api_keys({"GLIMP_API_KEYS": f"{KEY_B}, ", "GLIMP_KEYS_FILE": str(path)}) == [KEY_B]
    assert api_keys({}) == []


def test_runner_refuses_a_keys_file_without_keys(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.run",
            "--url",
            "http://127.0.0.1:9",
            "--keys-file",
            str(path),
            "--scenario",
            "large_only",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and "no API keys" in run.stderr
    assert not (tmp_path / "out").exists()
