"""The launcher's deploy progress: a deployment's state, and Serve's message when it gives one."""

from __future__ import annotations

from cluster.launcher import progress_line


def test_progress_line_shows_the_state_alone_without_a_message():
    assert progress_line("LargePool", "UPDATING", "", 4.2) == "  LargePool: UPDATING (4 s)"


def test_progress_line_keeps_a_one_line_message():
    line = progress_line("LargePool", "UPDATING", "1 replica has taken more than 30s to initialize.", 95)
    assert line == "  LargePool: UPDATING (95 s): 1 replica has taken more than 30s to initialize."


def test_progress_line_shows_a_start_failure_by_its_count_and_its_error():
    message = ("The deployment failed to start 1 times in a row. See controller logs for details. Error:\n"
               "Traceback (most recent call last):\n  File \"pool.py\", line 80, in __init__\n"
               "RuntimeError: Worker failed with error 'CUBLAS_STATUS_INTERNAL_ERROR'\n")
    line = progress_line("LargePool", "UPDATING", message, 183)
    assert line == ("  LargePool: UPDATING (183 s): The deployment failed to start 1 times in a row. See controller "
                    "logs for details. Error: ... RuntimeError: Worker failed with error 'CUBLAS_STATUS_INTERNAL_ERROR'")


def test_progress_line_is_cut_to_its_width():
    line = progress_line("SmallPool", "UPDATING", "x" * 1000, 1, width=80)
    assert len(line) == 80 and line.endswith("...") and line.startswith("  SmallPool: UPDATING (1 s): xxx")
