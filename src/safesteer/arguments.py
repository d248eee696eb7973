"""Typed config dataclasses as a command line: flags, ``--config`` YAML files and ``--help``.

Each field is one kebab-case option (``n_train`` -> ``--n-train``) whose help text is the field's
``metadata["help"]``; a boolean is ``--flag/--no-flag`` (``bool | str`` also takes ``--flag=auto``,
resolved where the option is used), a list takes one or more values, a field
without a default is required, and one marked ``metadata["positional"]`` is a bare operand
(``safesteer report DIR``). A YAML file's keys are the field names and its values are read like
flags: they become flags placed before the real ones, which therefore win. Every mistake is a
one-line SafesteerError naming the option (and, in a YAML file, the line). Imports nothing heavy,
so ``--help`` prints in a fraction of a second.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from safesteer.errors import SafesteerError
from safesteer.validation import flag

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}
_HELP_WIDTH = 100


@dataclass(frozen=True)
class Command:
    """A sub-command: its options (config dataclasses with their help-group titles, in the order
    the handler takes them) and the handler, named ``"module:function"`` so that it and its heavy
    imports load only when the command runs.

    ``group_order`` lists group titles to show first; a field's ``metadata["group"]`` moves it out
    of its class's group. ``presets`` are named sets of defaults (``--preset``), completed for the
    chosen ``--model`` by ``preset_defaults``.
    """

    name: str
    help: str
    handler: str
    groups: Callable[[], Sequence[tuple[type, str]]]
    group_order: Sequence[str] = ()
    presets: Mapping[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    preset_defaults: Callable[[str, str], dict[str, Any]] | None = None

    def run(self, *configs: Any) -> Any:
        module, _, function = self.handler.partition(":")
        return getattr(importlib.import_module(module), function)(*configs)


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line SafesteerError instead of printing usage and exiting."""

    options: dict[str, argparse.Action]

    def error(self, message: str) -> typing.NoReturn:
        raise SafesteerError(f"{message}; see `{self.prog} --help`")


class _Switch(argparse.BooleanOptionalAction):
    """``--flag/--no-flag`` with the help text as written (Python 3.11 appends its own default)."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = help


class _AutoSwitch(_Switch):
    """A switch that also takes ``auto`` (``--bf16=auto``): a choice left to the machine it runs on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nargs, self.metavar = "?", "auto"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        negated = bool(option_string and option_string.startswith("--no-"))
        if values is not None and (negated or values != "auto"):
            expected = "no value" if negated else "no value or auto"
            parser.error(f"argument {option_string}: expected {expected}, got {values!r}")
        setattr(namespace, self.dest, "auto" if values == "auto" else not negated)


class _Formatter(argparse.HelpFormatter):
    """Help that says "(required)" or the default, spelt as it would be typed."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=_HELP_WIDTH)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        default = action.default
        if default is None or default is argparse.SUPPRESS or not action.option_strings:
            return text
        if default == "auto" and isinstance(action, _AutoSwitch):
            shown = f"{action.option_strings[0]}=auto"
        elif isinstance(action, _Switch):
            shown = action.option_strings[0 if default else 1]
        elif isinstance(default, list):
            shown = " ".join(map(str, default))
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _field_type(hint: Any) -> tuple[type, bool]:
    """The item type of a field's annotation and whether it is a list (``list[int] | None`` ->
    ``(int, True)``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _add_option(group: argparse._ArgumentGroup, item: Field[Any], hint: Any) -> argparse.Action:
    kind, many = _field_type(hint)
    metadata = item.metadata
    if metadata.get("positional"):  # the command's one operand (`safesteer report DIR`)
        return group.add_argument(item.name, type=kind, metavar=metadata.get("metavar", "VALUE"),
                                  help=metadata.get("help"))
    kwargs: dict[str, Any] = {"dest": item.name, "help": metadata.get("help")}
    if item.default is not MISSING:
        kwargs["default"] = item.default
    elif item.default_factory is not MISSING:
        kwargs["default"] = item.default_factory()
    else:
        kwargs["required"] = True
    if kind is bool:
        auto = set(typing.get_args(hint)) == {bool, str}
        return group.add_argument(flag(item.name), action=_AutoSwitch if auto else _Switch, **kwargs)
    kwargs.update(type=kind, metavar=metadata.get("metavar", _METAVARS.get(kind, "VALUE")))
    if "choices" in metadata:
        kwargs.update(choices=metadata["choices"], metavar=None)
    if many:
        kwargs["nargs"] = "+"
    return group.add_argument(flag(item.name), **kwargs)


def build_parser(command: Command) -> _Parser:
    """The command's parser: one group of options per config, required ones in the usage line."""
    prog = f"safesteer {command.name}"
    parser = _Parser(prog=prog, description=command.help, formatter_class=_Formatter, allow_abbrev=False)
    parser.options = {}
    parser.add_argument("--config", metavar="FILE", help="YAML file of options, keyed by the names below "
                        "without the leading dashes (max_new_tokens: 32); flags on the command line win.")
    if command.presets:
        parser.add_argument("--preset", choices=sorted(command.presets), help="Defaults for a whole "
                            "run, overridden by --config and flags: "
                            + "; ".join(f"{name}: {text}" for name, (text, _) in command.presets.items()))
    titled: dict[str, argparse._ArgumentGroup] = {title: parser.add_argument_group(title)
                                                  for title in command.group_order}
    for cls, title in command.groups():
        hints = typing.get_type_hints(cls)
        for item in fields(cls):
            name = item.metadata.get("group", title)
            group = titled.get(name) or titled.setdefault(name, parser.add_argument_group(name))
            parser.options[item.name] = _add_option(group, item, hints[item.name])
    required = [" ".join([*action.option_strings[:1], str(action.metavar)])
                for action in parser.options.values() if action.required]
    parser.usage = " ".join([prog, *required, "[options]"])
    return parser


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """Option values as command-line tokens (``{"top_k": 5, "complement": False}`` ->
    ``--top-k=5 --no-complement``; a list gives one token per item), which the parser reads back
    exactly like typed flags; a None value is left out, so the option keeps its default."""
    tokens: list[str] = []
    for key, value in options.items():
        name = flag(key)
        if value is None:
            continue
        if isinstance(value, bool):
            tokens.append(name if value else f"--no-{name[2:]}")
        elif isinstance(value, list):
            tokens += [name, *map(str, value)]
        else:
            tokens.append(f"{name}={value}")
    return tokens


def _yaml_mapping(path: str) -> tuple[dict[Any, Any], dict[str, int]]:
    """The mapping in a YAML file and the line of each key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as missing:
        raise SafesteerError(f"config file {path} does not exist") from missing
    except (OSError, UnicodeDecodeError) as error:
        raise SafesteerError(f"config file {path}: cannot read it ({error})") from error
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        raise SafesteerError(f"{path}{f': line {mark.line + 1}' if mark else ''}: invalid YAML"
                             + (f" ({problem})" if problem else "")) from error
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict) or not isinstance(root, yaml.MappingNode):
        raise SafesteerError(f"{path}: expected a mapping of option names to values")
    return loaded, {str(key.value): key.start_mark.line + 1 for key, _ in root.value}


def _yaml_value_problem(action: argparse.Action, value: Any) -> str | None:
    """Why ``value`` cannot be given to ``action``'s option, or None."""
    if isinstance(action, _AutoSwitch):
        good = isinstance(value, bool) or value == "auto"
        return None if good else f"expected true, false or auto, got {value!r}"
    if isinstance(action, _Switch):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and action.nargs != "+":
        return f"expected one value, got a list {value!r}"
    if not items:
        return "expected at least one value"
    for item in items:
        try:
            converted = action.type(str(item)) if callable(action.type) else item
        except (TypeError, ValueError):
            return f"invalid {getattr(action.type, '__name__', 'value')} value {item!r}"
        if action.choices is not None and converted not in action.choices:
            return f"must be one of {', '.join(map(str, action.choices))}, got {item!r}"
    return None


def yaml_arguments(path: str, parser: _Parser) -> list[str]:
    """A flat YAML file of options as command-line tokens; a bad key or value names its line."""
    loaded, lines = _yaml_mapping(path)
    tokens: list[str] = []
    for key, value in loaded.items():
        where = f"{path}: line {lines.get(str(key), '?')}"
        action = parser.options.get(str(key).replace("-", "_"))
        if action is None:
            raise SafesteerError(f"{where}: unknown option {key!r}; see `{parser.prog} --help`")
        problem = None if value is None else _yaml_value_problem(action, value)
        if problem:
            raise SafesteerError(f"{where}: {key}: {problem}")
        tokens += option_flags({action.dest: value}) if action.option_strings else [str(value)]
    return tokens


def _unknown(parser: _Parser, remaining: Sequence[str]) -> SafesteerError:
    """The error for tokens no option took, suggesting the spelling meant."""
    options = [token for token in remaining if token.startswith("-")]
    if not options:
        return SafesteerError(f"unexpected value(s) {' '.join(remaining)} (a switch such as --overwrite "
                              "takes no value: --no-overwrite turns it off); see "
                              f"`{parser.prog} --help`")
    known = [option for action in parser.options.values() for option in action.option_strings]
    hints = [match for token in options
             for match in difflib.get_close_matches(token.split("=")[0].replace("_", "-"), known, n=1)]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return SafesteerError(f"unknown option(s) {' '.join(options)}{hint}; see `{parser.prog} --help`")


def parse(command: Command, argv: Sequence[str]) -> list[Any]:
    """The command's configs from a YAML file (``--config``), a preset and flags, later ones winning."""
    parser = build_parser(command)
    early = _Parser(prog=parser.prog, add_help=False, allow_abbrev=False)
    for name in ("--config", "--preset", "--model"):
        early.add_argument(name)
    known = early.parse_known_args(list(argv))[0]
    arguments = list(argv)
    if known.config:
        arguments = yaml_arguments(known.config, parser) + arguments
    if command.preset_defaults is not None and known.preset in command.presets:
        model = (early.parse_known_args(arguments)[0].model or command.presets[known.preset][1].get("model")
                 or parser.get_default("model"))
        parser.set_defaults(**command.preset_defaults(known.preset, model))
    namespace, remaining = parser.parse_known_args(arguments)
    if remaining:
        raise _unknown(parser, remaining)
    return [cls(**{item.name: getattr(namespace, item.name) for item in fields(cls)})
            for cls, _ in command.groups()]
