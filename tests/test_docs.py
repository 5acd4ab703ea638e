"""The docs a user reads: ``docs/benchmarks.md`` stays one page whose figures are in the raw files under
``docs/gpu/``, every ``docs/...`` path the repository names exists, and no doc says how its hardware was
obtained or cites the project's issue numbers."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
GPU = ROOT / "docs" / "gpu"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Files that may name docs paths: docs, code and its docstrings, configs, tests (this file's patterns aside).
SOURCES = [
    *DOCS,
    *(
        p
        for ext in ("py", "yaml", "toml", "sh")
        for p in sorted(ROOT.glob(f"[!.]*/**/*.{ext}"))
        if ".venv" not in p.parts and p != Path(__file__).resolve()
    ),
]
DOCS_PATH = re.compile(r"(?<![\w/.:-])docs/[\w./*-]*[\w*]")
RUN_FILE = re.compile(r"`(20\d\d-\d\d-\d\d[\w-]*/[^`\s]+)`")  # a raw file named relative to docs/gpu/
FORBIDDEN = [  # how hardware was obtained, machine-kind names, issue numbers
    re.compile(r"\blent\b", re.IGNORECASE),
    re.compile(r"\blease[sd]?\b", re.IGNORECASE),
    re.compile(r"\bdevice machines?\b", re.IGNORECASE),
    re.compile(r"\bissue [0-9]", re.IGNORECASE),
    re.compile(r"nvidia-h[12]00"),  # lower case: a machine kind; Kubernetes' NVIDIA-H100-80GB-HBM3 label is fine
]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first markdown table whose header row starts with ``header_start``, as cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def seconds(cell: str) -> float:
    return float(cell.removesuffix(" s"))


def shown(cell: str, value: float) -> bool:
    """Whether ``cell`` (a number, or seconds) is ``value`` rounded to the digits it shows (ties either way)."""
    number = cell.removesuffix(" s").removesuffix("x")
    digits = len(number.partition(".")[2])
    return abs(float(number) - value) <= 0.5 * 10**-digits + 1e-9


def source_file(cell: str) -> Path:
    return GPU / re.search(r"`([^`]+\.json)`", cell).group(1)


def test_benchmarks_is_one_page_under_200_lines():
    lines = BENCHMARKS.read_text().splitlines()
    assert len(lines) < 200, f"docs/benchmarks.md has {len(lines)} lines"
    prose = re.sub(r"```.*?```", "", BENCHMARKS.read_text(), flags=re.DOTALL).splitlines()
    assert len([line for line in prose if line.startswith("# ")]) == 1, "one page: one title"


def test_benchmarks_says_random_weights_and_forced_routing_first():
    text = BENCHMARKS.read_text()
    first_section = text.split("\n## ")[1]
    assert first_section.startswith("Read this first")
    assert "weights are random" in first_section and "routing is forced" in first_section


def test_readme_headline_says_what_was_forced():
    text = (ROOT / "README.md").read_text()
    headline = next(paragraph for paragraph in text.split("\n\n") if "1.55x" in paragraph)
    assert "random weights" in headline and "forced" in headline and "docs/benchmarks.md" in headline


@pytest.mark.parametrize("source", SOURCES, ids=rel)
def test_every_docs_path_named_exists(source: Path):
    text = source.read_text(errors="replace")
    missing = [path for path in DOCS_PATH.findall(text) if not glob.glob(str(ROOT / path.rstrip(".")))]
    assert not missing, f"{rel(source)} names paths that do not exist: {missing}"


def test_every_raw_file_benchmarks_names_exists():
    named = RUN_FILE.findall(BENCHMARKS.read_text())
    assert len(named) >= 15
    missing = [path for path in named if not glob.glob(str(GPU / path))]
    assert not missing, f"docs/benchmarks.md names raw files that are not under docs/gpu/: {missing}"


def test_every_run_folder_has_notes():
    folders = [path for path in GPU.iterdir() if path.is_dir()]
    assert len(folders) >= 10
    assert [rel(path) for path in folders if not (path / "notes.md").exists()] == []
    assert [rel(path) for path in GPU.iterdir() if path.is_file()] == [], "raw files belong in a run folder"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_no_doc_says_how_hardware_was_obtained_or_cites_issues(doc: Path):
    found = [
        (number, match.group(0))
        for number, line in enumerate(doc.read_text().splitlines(), 1)
        for pattern in FORBIDDEN
        if (match := pattern.search(line))
    ]
    assert not found, f"{rel(doc)}: {found}"


LEVEL_KEYS = ("throughput_rps", "steady_rps", "p50_s", "p95_s", "ttft_p95_s")  # a load row's figures, in order


def is_a_level(cells: tuple[str, ...], levels: list[dict]) -> bool:
    """Whether a load row's figures (``LEVEL_KEYS``' cells) are those of one of ``levels``, as rounded."""
    return any(all(shown(cell, level[key]) for cell, key in zip(cells, LEVEL_KEYS, strict=True)) for level in levels)


def test_load_rows_are_levels_of_their_raw_files():
    rows = table_rows(BENCHMARKS.read_text(), "| hardware | layout | in flight |")
    assert len(rows) >= 6
    for hardware, layout_name, in_flight, *cells, source in rows:
        data = json.loads(source_file(source).read_text())
        assert data["layout"] == {"routed": "routed-2gpu", "large only": "large-only-2gpu"}[layout_name]
        levels = [level for level in data["levels"] if level["concurrency"] == int(in_flight)]
        assert is_a_level(tuple(cells), levels), (
            f"{hardware}, {layout_name}, {in_flight}: {cells} is no level of {source}"
        )


def test_one_gpu_rows_are_levels_of_their_raw_files():
    rows = table_rows(BENCHMARKS.read_text(), "| hardware | GPU sharing | arm |")
    assert len(rows) >= 4
    arms = {"routed": "stream", "large only": "large"}
    for hardware, sharing, arm, in_flight, *cells, source in rows:
        data = json.loads(source_file(source).read_text())
        assert data["layout"] == "one-gpu" and data["mps"] == (sharing == "MPS"), f"{hardware}, {sharing}: {source}"
        levels = [lv for lv in data["levels"] if lv["concurrency"] == int(in_flight) and lv["arm"] == arms[arm]]
        assert is_a_level(tuple(cells), levels), f"{hardware}, {sharing}, {arm}: {cells} is no level of {source}"


def test_single_stream_rows_are_their_raw_files():
    rows = table_rows(BENCHMARKS.read_text(), "| hardware | routed (3 requests) |")
    assert len(rows) >= 2
    for hardware, routed, routed_p50, large_only, faster, _router_share, source in rows:
        data = json.loads(source_file(source).read_text())
        totals = sorted(row["total_s"] for row in data["rows"] if row["policy"] == "routed")
        large = [row["total_s"] for row in data["rows"] if row["policy"] == "large_only"]
        cells = routed.removesuffix(" s").split(", ")
        assert len(cells) == len(totals) and all(map(shown, cells, totals)), hardware
        assert shown(routed_p50, totals[len(totals) // 2]), hardware
        assert len(large) == 1 and shown(large_only, large[0]), hardware
        assert shown(faster, large[0] / totals[len(totals) // 2]), hardware
