"""Progress bars off a terminal (pytest captures stderr): log lines, never carriage returns."""

from __future__ import annotations

import logging

import pytest

from safesteer.progress import progress_bar


def test_a_short_bar_says_nothing_in_a_log(caplog: pytest.LogCaptureFixture, capsys) -> None:
    with caplog.at_level(logging.INFO):
        assert list(progress_bar(range(3), desc="short")) == [0, 1, 2]
    assert not caplog.records and "\r" not in capsys.readouterr().err


def test_a_long_bar_logs_whole_lines_and_postfixes_wait_for_the_next(caplog: pytest.LogCaptureFixture,
                                                                     capsys) -> None:
    with caplog.at_level(logging.INFO), progress_bar(total=4, desc="distill", unit="step", delay=0,
                                                     mininterval=3600) as bar:
        for step in range(4):
            bar.set_postfix({"loss": f"{step}.5"})
            bar.update(1)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["distill: 0/4 (0 %) [00:00 elapsed, ? left]",
                     "distill: 4/4 (100 %) [00:00 elapsed, 00:00 left, loss=3.5]"]
    assert "\r" not in capsys.readouterr().err
