"""The range checks every config shares: one wording, the flag spelt as typed, NaN never passes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from safesteer.errors import SafesteerError
from safesteer.validation import (
    check_choice,
    check_layers,
    check_not_empty,
    check_range,
    flag,
    token_ids_problem,
)


@dataclass
class Settings:
    kl_threshold: float = 0.1
    response_betas: list[float] = field(default_factory=lambda: [0.1, 0.2])
    gate_layer: int | None = None
    mode: str = "subset"
    vote_prompts: str = "set"


def test_flag_is_kebab_case() -> None:
    assert flag("kl_threshold") == "--kl-threshold"


@pytest.mark.parametrize(("value", "bounds", "message"), [
    (-1.0, {"low": 0}, "--kl-threshold must be >= 0, got -1"),
    (0.0, {"low": 0, "low_open": True}, "--kl-threshold must be > 0, got 0"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, "--kl-threshold must be in [0, 1), got 1"),
    (2.0, {"high": 1}, "--kl-threshold must be <= 1, got 2"),
    (math.nan, {"low": 0}, "--kl-threshold must be a finite number, got nan"),
    (math.inf, {}, "--kl-threshold must be a finite number, got inf"),
    ("0.5", {"low": 0}, "--kl-threshold must be a number, got '0.5'"),
    (True, {"low": 0}, "--kl-threshold must be a number, got True"),
])
def test_check_range_refuses_with_one_wording(value: object, bounds: dict, message: str) -> None:
    with pytest.raises(SafesteerError) as error:
        check_range(Settings(kl_threshold=value), "kl_threshold", **bounds)  # type: ignore[arg-type]
    assert str(error.value) == message


def test_check_range_accepts_bounds_checks_list_items_and_skips_none() -> None:
    check_range(Settings(kl_threshold=0.0), "kl_threshold", low=0, high=1)
    check_range(Settings(), ("response_betas", "gate_layer"), low=0, low_open=True)
    with pytest.raises(SafesteerError, match="--response-betas must be a finite number, got nan"):
        check_range(Settings(response_betas=[0.1, math.nan]), "response_betas", low=0)


def test_choice_empty_and_layers() -> None:
    with pytest.raises(SafesteerError, match="--mode must be one of full, subset, got 'x'"):
        check_choice(Settings(mode="x"), "mode", ("full", "subset"))
    with pytest.raises(SafesteerError, match="--vote-prompts must not be empty"):
        check_not_empty(Settings(vote_prompts=" "), "vote_prompts")
    check_layers("response_layers", None, 2)
    check_layers("response_layers", [0, 1], 2)
    with pytest.raises(SafesteerError, match=r"--response-layers: layer\(s\) 2, 7 outside 0\.\.1 "
                                              r"\(the model has 2 layers\)"):
        check_layers("response_layers", [7, 0, 2, 7], 2)


@pytest.mark.parametrize(("ids", "vocab_size", "fits"), [
    ([3, 1, 7], 8, True),
    ([], 8, True),
    ([3, 3], 8, False),  # a repeated id would count twice in the loss
    ([8], 8, False),
    ([-1], None, False),
    ([10**6], None, True),  # no vocabulary yet: only the sign is known
    ([True], 8, False),
    ([1.0], 8, False),
])
def test_token_ids_problem_one_rule_for_every_reader(ids: list, vocab_size: int | None, fits: bool) -> None:
    problem = token_ids_problem(ids, vocab_size)
    assert (problem is None) == fits
    if not fits:
        assert problem == (f"ids must be distinct integers in [0, {vocab_size or 'vocabulary size'}), "
                           f"got {ids}")
