"""Layers point one way: the base (config, metric names, topology) imports no other package of the project; the
pools and the router build on it; the operators' tools sit above them; the load tests on top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "deployments", "router_service", "loadtests")
# module prefix -> layer; a module may import only modules of its own layer or below (the longest prefix wins)
LAYERS = {
    "cluster": 0,
    "cluster.config": 0,
    "cluster.pool_config": 0,
    "cluster.strict": 0,
    "cluster.metrics": 0,
    "cluster.topology": 0,
    "deployments": 1,
    "router_service": 2,
    "cluster.ops": 3,
    "cluster.__main__": 3,
    "loadtests": 4,
}


def layer_of(module: str) -> int:
    """The layer of a project module (by its longest prefix in ``LAYERS``)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:n])) in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project package in a file, nested imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from cluster import metrics` imports cluster.metrics
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def upward_imports(root: Path = REPO) -> list[str]:
    """Every import in the project's packages that points to a higher layer, as ``file:line: a -> b``."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            own = module_name(path)
            for line, imported in project_imports(path):
                if layer_of(imported) > layer_of(own):
                    bad.append(
                        f"{path.relative_to(root)}:{line}: {own} (layer {layer_of(own)}) imports {imported} "
                        f"(layer {layer_of(imported)})"
                    )
    return bad


def test_no_import_points_up():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a base module that imports the router is reported."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "cluster" / "config.py").write_text("def f():\n    from router_service.api import app\n")
    (tmp_path / "router_service" / "api.py").write_text("from cluster import config\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert upward_imports(tmp_path) == [
        "cluster/config.py:2: cluster.config (layer 0) imports router_service.api.app (layer 2)"
    ]


@pytest.mark.parametrize("command", [["plan", "--help"], ["tenants", "--help"], ["render", "--help"]])
def test_operator_commands_do_not_import_ray(command):
    """The CLI's commands that need no cluster start without Ray Serve."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['cluster', *{command!r}]\n"
        "try:\n    runpy.run_module('cluster', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('RAY' if 'ray' in sys.modules else 'NO RAY')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("NO RAY"), out.stdout + out.stderr
