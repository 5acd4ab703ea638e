"""The README's recipes run as written on the real local cluster: the curl and OpenAI SDK examples, and the load
test recipe (tenant created with ``--json``, its output read by ``--keys-file``). The only changes made to a
recipe: ``.venv/bin/python`` is this interpreter, and the load test runs each scenario for 20 s, not 150 s."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]


def block(marker: str, language: str) -> str:
    """The README's fenced ``language`` block that contains ``marker``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} {language} blocks of the README hold {marker!r}"
    return found[0]


def as_here(script: str) -> str:
    return script.replace(".venv/bin/python", sys.executable)


def test_curl_example(local_cluster):
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block("curl -s", "bash")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion" and body["routing"]["steps"], body


def test_openai_sdk_example(local_cluster):
    out = subprocess.run(
        [sys.executable, "-c", block("from openai import OpenAI", "python")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "'steps': [" in out.stdout  # the routing object was printed


def test_load_test_recipe(local_cluster, tmp_path):
    script = as_here(block("loadtests.run", "bash")).replace("--duration 150s", "--duration 20s")
    subprocess.run(
        [sys.executable, "-m", "cluster", "tenants", "delete", "team-a", "--redis-url", local_cluster.redis_url()],
        capture_output=True,
        timeout=60,
    )  # from an earlier run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for scenario in ("glimprouter-tau1.0", "large_only", "small_only"):
        assert (tmp_path / "results" / f"{scenario}_stats.csv").exists(), scenario
    shutil.rmtree(tmp_path / "results")
