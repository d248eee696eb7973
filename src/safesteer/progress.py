"""Progress bars that suit where the output goes.

On a terminal, a live tqdm bar. Redirected to a log file or a pipe, where carriage-return redraws
pile up as junk, the same bar becomes a plain log line at most every ``LOG_INTERVAL_S`` seconds and
once at the end.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0
logger = logging.getLogger("safesteer.progress")


class _LogLines:
    """A file for tqdm that logs each redraw as one line."""

    def write(self, text: str) -> None:
        line = text.strip()
        if line:
            logger.info(line)

    def flush(self) -> None:
        """Nothing is buffered."""


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, drawn live only when stderr is a terminal."""
    if not sys.stderr.isatty():
        kwargs = {"file": _LogLines(), "mininterval": LOG_INTERVAL_S, "ascii": True, "ncols": 100, **kwargs}
    return tqdm(iterable, **kwargs)


def quiet_when_not_a_terminal() -> None:
    """Turn off the Hugging Face libraries' own download and loading bars when stderr is not a
    terminal: through the variable they read when first imported, or, in a process that has
    imported them already, through their switch."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
