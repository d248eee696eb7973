"""Progress bars that suit where the output goes.

On a terminal, a live tqdm bar. Redirected to a log file or a pipe, where carriage-return redraws
pile up as junk, the same bar becomes a plain log line every ``LOG_INTERVAL_S`` seconds and one at
the end, and a bar that finishes sooner stays silent.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0
_LOG_FORMAT = ("{desc}: {n_fmt}/{total_fmt} ({percentage:.0f} %) "
               "[{elapsed} elapsed, {remaining} left{postfix}]")
logger = logging.getLogger("safesteer.progress")


class _LogLines:
    """A file for tqdm that logs each redraw as one line (the closing redraw repeats the last)."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> None:
        line = text.strip()
        if line and line != self.last:
            logger.info(line)
            self.last = line

    def flush(self) -> None:
        """Nothing is buffered."""


class _LoggedBar(tqdm):
    """A bar for a log: a new postfix waits for the next periodic line instead of forcing one."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, drawn live only when stderr is a terminal; otherwise a bar
    that ends within ``LOG_INTERVAL_S`` says nothing, and a longer one logs a line that often."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    defaults = {"file": _LogLines(), "mininterval": LOG_INTERVAL_S, "delay": LOG_INTERVAL_S,
                "bar_format": _LOG_FORMAT}
    return _LoggedBar(iterable, **{**defaults, **kwargs})


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
