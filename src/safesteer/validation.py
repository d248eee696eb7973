"""Value checks shared by every config's ``__post_init__``: one way to spell a flag, one wording.

A bad value must fail while the options are read, before a model is loaded or a file written, and
name the flag as the user typed it (``--kl-threshold``), whether it came from the command line, a
YAML file or Python. Imports nothing heavy, so ``safesteer --help`` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from safesteer.errors import SafesteerError


def flag(name: str) -> str:
    """The command-line spelling of a config field: ``kl_threshold`` -> ``--kl-threshold``."""
    return "--" + name.replace("_", "-")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    assert high is not None
    return f"{'<' if high_open else '<='} {high:g}"


def check_range(config: object, names: str | Iterable[str], *, low: float | None = None,
                high: float | None = None, low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a field of ``config`` that is not a finite number between ``low`` and ``high``
    (inclusive unless ``*_open``); a list field is checked item by item, a None field skipped.

    NaN and infinities are always refused: they pass no comparison the method relies on, and
    would be written into the artifacts as invalid JSON.
    """
    for name in [names] if isinstance(names, str) else names:
        value = getattr(config, name)
        for item in value if isinstance(value, list) else [] if value is None else [value]:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise SafesteerError(f"{flag(name)} must be a number, got {item!r}")
            if not math.isfinite(item):
                raise SafesteerError(f"{flag(name)} must be a finite number, got {item}")
            if ((low is not None and (item <= low if low_open else item < low))
                    or (high is not None and (item >= high if high_open else item > high))):
                raise SafesteerError(f"{flag(name)} must be {_interval(low, high, low_open, high_open)}, "
                                     f"got {item:g}")


def check_choice(config: object, name: str, choices: Sequence[str]) -> None:
    """Refuse a field of ``config`` that is not one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise SafesteerError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_not_empty(config: object, names: str | Iterable[str]) -> None:
    """Refuse a text or list field of ``config`` that is empty (or only whitespace)."""
    for name in [names] if isinstance(names, str) else names:
        value: Any = getattr(config, name)
        if value is not None and not (value.strip() if isinstance(value, str) else value):
            raise SafesteerError(f"{flag(name)} must not be empty")


def check_layers(name: str, layers: Iterable[int] | None, depth: int) -> None:
    """Refuse layer indices outside the model's ``depth`` decoder blocks, once its config is read."""
    outside = sorted({layer for layer in layers or () if not 0 <= layer < depth})
    if outside:
        raise SafesteerError(f"{flag(name)}: layer(s) {', '.join(map(str, outside))} outside "
                             f"0..{depth - 1} (the model has {depth} layers)")


def token_ids_problem(ids: Sequence[object], vocab_size: int | None = None) -> str | None:
    """What makes ``ids`` unfit as the safety tokens S (docs/method.md §5 step 10), or None.

    Each must be an int (not a bool), none repeated (a repeated id would count twice in the loss),
    each in [0, ``vocab_size``), or only >= 0 while the vocabulary is unknown (a file read before
    its model). One rule for the artifact, the trainer and the loss, each wording its own error.
    """
    def fits(index: object) -> bool:
        return (isinstance(index, int) and not isinstance(index, bool) and index >= 0
                and (vocab_size is None or index < vocab_size))

    if all(fits(index) for index in ids) and len(set(ids)) == len(ids):
        return None
    bound = "[0, vocabulary size)" if vocab_size is None else f"[0, {vocab_size})"
    return f"ids must be distinct integers in {bound}, got {list(ids)}"
