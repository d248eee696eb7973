"""The HTML of a report: escaped text, tables, sections and the page around them.

Everything read from a directory (answers above all: untrusted model output) is text and is
escaped; only what this package builds is :class:`Markup`. The page carries its own stylesheet
and no script, so it opens offline, from a mail attachment or a file browser alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape


class Markup(str):
    """HTML built by this package, inserted as is; any plain ``str`` is escaped."""


Content = str | Markup


def html(value: Content) -> Markup:
    return value if isinstance(value, Markup) else Markup(escape(str(value)))


def join(parts: Iterable[Content]) -> Markup:
    return Markup("".join(html(part) for part in parts))


def tag(name: str, *children: Content, **attributes: str) -> Markup:
    """``<name attributes>children</name>``; ``class_`` stands for ``class``."""
    attrs = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{escape(value)}"' for key, value in attributes.items()
    )
    return Markup(f"<{name}{attrs}>{join(children)}</{name}>")


def percent(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return "n/a" if math.isnan(value) else f"{100 * value:.{digits}f}%"


def number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1e4 or 0 < abs(value) < 1e-3:
        return f"{value:.{max(1, digits - 1)}e}"
    return f"{value:.{digits}f}"


def table(
    header: Sequence[Content], rows: Iterable[Sequence[Content]], caption: str = "", numeric_from: int = 1
) -> Markup:
    """A table; columns from ``numeric_from`` on are right-aligned (figures line up)."""
    head = tag("tr", *(tag("th", cell) for cell in header))
    body = [
        tag(
            "tr",
            *(
                tag("td", cell, class_="num") if index >= numeric_from else tag("td", cell)
                for index, cell in enumerate(row)
            ),
        )
        for row in rows
    ]
    return tag(
        "table", *([tag("caption", caption)] if caption else []), tag("thead", head), tag("tbody", *body)
    )


def definitions(pairs: Iterable[tuple[str, Content]]) -> Markup:
    return tag("dl", *(join([tag("dt", key), tag("dd", value)]) for key, value in pairs))


def figures(svgs: Sequence[str], caption: str = "") -> Markup:
    """Plots side by side, wrapping on a narrow screen; ``svgs`` are :mod:`.svg` output."""
    body = [Markup(svg) for svg in svgs]
    return tag(
        "figure", tag("div", *body, class_="plots"), *([tag("figcaption", caption)] if caption else [])
    )


def section(anchor: str, title: str, *children: Content, level: int = 2) -> Markup:
    return tag("section", tag(f"h{level}", title), *children, id=anchor)


def note(text: Content) -> Markup:
    return tag("p", text, class_="note")


def anchor_id(*parts: str) -> str:
    """A fragment id from free text (a method or benchmark name)."""
    return "-".join("".join(char if char.isalnum() else "-" for char in part.lower()) for part in parts)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1b1b1b; margin: 0 auto; max-width: 1180px;
       padding: 0 18px 40px; }
header { border-bottom: 2px solid #0072B2; margin-bottom: 8px; }
h1 { font-size: 22px; margin: 16px 0 2px; } h2 { font-size: 18px; margin-top: 28px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
nav ul { list-style: none; padding: 0; margin: 6px 0 10px; display: flex; flex-wrap: wrap; gap: 4px 16px; }
a { color: #0061a0; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
caption { text-align: left; font-weight: bold; padding: 2px 0 4px; }
th, td { border-bottom: 1px solid #dddddd; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f2f5f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0 12px; }
dt { font-weight: bold; } dd { margin: 0; }
figure { margin: 8px 0 16px; } figcaption { font-size: 12px; color: #555555; }
.plots, .columns { display: flex; flex-wrap: wrap; gap: 10px 24px; align-items: flex-start; }
.note { font-size: 12px; color: #555555; }
.ci { color: #666666; font-size: 11px; }
details { border: 1px solid #dddddd; border-radius: 4px; padding: 4px 10px; margin: 8px 0; }
summary { cursor: pointer; font-weight: bold; }
.prompt { background: #f6f6f6; padding: 6px 8px; margin: 10px 0 4px; border-left: 3px solid #888888;
          white-space: pre-wrap; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 8px; }
.answer { border: 1px solid #dddddd; border-radius: 4px; padding: 6px 8px; }
.answer pre { white-space: pre-wrap; word-break: break-word; font: 12px/1.4 ui-monospace, monospace;
              margin: 4px 0 0; }
.verdict { font-size: 11px; padding: 1px 6px; border-radius: 8px; float: right; }
.refused { background: #d9eefc; } .answered { background: #fbe3cf; }
@media print { body { max-width: none; } nav, summary { display: none; }
               details { border: none; padding: 0; } section, figure, .answer { break-inside: avoid; } }
"""


def document(title: str, subtitle: str, contents: Sequence[tuple[str, str]], body: Sequence[Content]) -> str:
    """The whole page: a header, a table of contents of (anchor, title) and the sections."""
    links = tag("ul", *(tag("li", tag("a", name, href=f"#{anchor}")) for anchor, name in contents))
    header = tag("header", tag("h1", title), tag("p", subtitle, class_="note"), tag("nav", links))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{header}{tag('main', *body)}</body></html>\n"
    )
