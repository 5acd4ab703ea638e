"""The launcher's deploy progress: a deployment's state, and Serve's message shortened to one line."""

from __future__ import annotations

from cluster.ops.launcher import message_summary, progress_line

START_FAILED = """The deployment failed to start 1 times in a row. See controller logs for details. Error:
Traceback (most recent call last):
  File "replica.py", line 1928, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "deployments/pool.py", line 170, in __init__
    self.engine = AsyncLLM.from_engine_args(args)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (1000000) is greater than the derived max_model_len
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""


def test_progress_line_shows_the_state_alone_without_a_message():
    assert progress_line("LargePool", "UPDATING", "", 4.2) == "  LargePool: UPDATING (4 s)"


def test_progress_line_keeps_a_one_line_message():
    line = progress_line("LargePool", "UPDATING", "1 replica has taken more than 30s to initialize.", 95)
    assert line == "  LargePool: UPDATING (95 s): 1 replica has taken more than 30s to initialize."


def test_a_start_failure_is_summarized_by_its_count_and_the_exception_it_ended_with():
    assert message_summary(START_FAILED) == (
        "The deployment failed to start 1 times in a row. See controller logs for details. Error: ... "
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig Value error, "
        "User-specified max_model_len (1000000) is greater than the derived max_model_len"
    )


def test_a_message_without_a_traceback_keeps_its_first_and_last_lines():
    message = "Deployment 'SmallPool' has 1 replicas that have taken more than 30s.\nMiddle.\nMaybe a slow __init__."
    assert message_summary(message) == (
        "Deployment 'SmallPool' has 1 replicas that have taken more than 30s. ... Maybe a slow __init__."
    )


def test_progress_line_is_cut_to_its_width():
    line = progress_line("SmallPool", "UPDATING", "x" * 1000, 1, width=80)
    assert len(line) == 80 and line.endswith("...") and line.startswith("  SmallPool: UPDATING (1 s): xxx")
