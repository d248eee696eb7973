"""Local prompt files: .json, .jsonl, .csv and .txt, read and checked record by record.

The pinned wheels' members (docs/data.md) go through the same parser, so a malformed file and a
malformed member fail alike: the message names the file, the line or record, and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safesteer.errors import SafesteerError

PROMPT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")

_EXPECTED = {
    ".json": "a JSON list of strings or of objects with a {field!r} field",
    ".jsonl": "one JSON object with a {field!r} field (or one JSON string) per line",
    ".csv": "a header row with a {field!r} column (or a single column), then one prompt per row",
    ".txt": "one prompt per non-empty line",
}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def load_prompt_file(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a .json, .jsonl, .csv or .txt file, in file order.

    Errors name the file and the line (or JSON record) at fault, so a user can fix the file.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise SafesteerError(
            f"{path}: unsupported prompt file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(PROMPT_SUFFIXES)}"
        )
    if not path.is_file():
        raise SafesteerError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SafesteerError(f"{path}: not UTF-8 text (bad byte at {error.start})") from error
    return parse_prompts(text, suffix, field, str(path))


def parse_prompts(text: str, suffix: str, field: str, origin: str) -> list[str]:
    """Shared by local files and wheel members; ``origin`` names the source in error messages."""
    expected = _EXPECTED[suffix].format(field=field)
    if not text.strip():
        raise SafesteerError(f"{origin}: file is empty; expected {expected}")
    parsers: dict[str, Callable[[str, str, str], list[str]]] = {
        ".json": _parse_json, ".jsonl": _parse_jsonl, ".csv": _parse_csv, ".txt": _parse_txt,
    }
    prompts = parsers[suffix](text, field, origin)
    if not prompts:
        raise SafesteerError(f"{origin}: no prompts found; expected {expected}")
    return prompts


def checked_prompt(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise SafesteerError(
            f"{where}: {field!r} must be a string, got {_JSON_TYPES.get(type(value), 'other')}"
        )
    if not value.strip():
        raise SafesteerError(f"{where}: {field!r} is empty")
    return value


def record_prompt(record: Any, where: str, field: str) -> str:
    """A record is either the prompt string itself or an object holding it under ``field``."""
    if isinstance(record, str):
        return checked_prompt(record, where, field)
    if isinstance(record, dict):
        if field not in record:
            raise SafesteerError(
                f"{where}: no {field!r} field (found: {', '.join(map(str, record)) or 'none'}); "
                "pass --prompt-field to choose another"
            )
        return checked_prompt(record[field], where, field)
    raise SafesteerError(
        f"{where}: expected a string or an object with a {field!r} field, "
        f"got {_JSON_TYPES.get(type(record), 'other')}"
    )


def _parse_json(text: str, field: str, origin: str) -> list[str]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"{origin}: line {error.lineno}"
        raise SafesteerError(f"{where}: invalid JSON ({error.msg})") from error
    if not isinstance(records, list):
        raise SafesteerError(
            f"{origin}: expected {_EXPECTED['.json'].format(field=field)}, "
            f"got a JSON {_JSON_TYPES.get(type(records), 'other')}"
        )
    return [record_prompt(record, f"{origin}: record {index}", field)
            for index, record in enumerate(records, 1)]


def _parse_jsonl(text: str, field: str, origin: str) -> list[str]:
    prompts = []
    for line_number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{origin}: line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SafesteerError(
                f"{where}: invalid JSON ({error.msg} at column {error.colno})"
            ) from error
        prompts.append(record_prompt(record, where, field))
    return prompts


def _parse_txt(text: str, field: str, origin: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def csv_table(text: str, origin: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (first line, cells) of each non-blank row; quoted newlines advance the count."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    try:
        header = [name.strip() for name in next(reader)]
        end_line = reader.line_num
        for cells in reader:
            start_line, end_line = end_line + 1, reader.line_num
            if any(cell.strip() for cell in cells):
                rows.append((start_line, cells))
    except csv.Error as error:
        where = f"{origin}: line {reader.line_num}"
        raise SafesteerError(f"{where}: malformed CSV ({error})") from error
    return header, rows


def _parse_csv(text: str, field: str, origin: str) -> list[str]:
    header, rows = csv_table(text, origin)
    if field in header:
        column = header.index(field)
    elif len(header) == 1:
        column = 0
    else:
        raise SafesteerError(
            f"{origin}: line 1: no {field!r} column (columns: {', '.join(header)}); "
            "pass --prompt-field to choose one"
        )
    prompts = []
    for line_number, cells in rows:
        where = f"{origin}: line {line_number}"
        if column >= len(cells):
            raise SafesteerError(f"{where}: row has no {header[column]!r} cell")
        prompts.append(checked_prompt(cells[column], where, header[column]))
    return prompts
