"""What the Locust scenarios and their runners share: the headless command line, and recording one sample."""

from __future__ import annotations

import sys
from pathlib import Path


def headless_command(
    locustfile: Path, url: str, users: int, duration: str, stop_timeout: str, csv_prefix: Path
) -> list[str]:
    """The headless Locust command line of a run: every user spawned at once, a summary and CSVs at the end."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--only-summary",
        "--host",
        url,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        duration,
        "--stop-timeout",
        stop_timeout,
        "--csv",
        str(csv_prefix),
    ]


def fire(request_type: str, name: str, value: float, error: str | None = None) -> None:
    """Record one sample (or failure) in Locust's stats."""
    from locust import events

    events.request.fire(
        request_type=request_type,
        name=name,
        response_time=value,
        response_length=0,
        exception=RuntimeError(error) if error else None,
        context={},
    )
