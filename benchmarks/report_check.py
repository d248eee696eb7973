"""Browser check of `safesteer report`: render the page in headless Chromium and fail when it, or
one of its plots, comes out blank.

    .venv/bin/python benchmarks/report_check.py runs/demo [--install] [--screenshot docs/report.png]

DIR is a run, eval or compare directory (its report is written to a temporary file) or an HTML
file. Two renderings are checked: the whole page (a tall window) must carry ink, and a contact
sheet with every inline SVG plot of the page in a cell of its own must have ink in every cell and
the plots' colours somewhere. ``--install`` installs Debian's ``chromium`` with apt-get when no
Chromium is found; ``--screenshot`` keeps a laptop-screen view of the top of the page (for the
README). Exit status: 0 the page rendered, 1 it is blank or a plot is, 2 no browser.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

from safesteer.htmlreport.build import write_report
from safesteer.htmlreport.svg import PALETTE

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CELL_WIDTH, CELL_HEIGHT, COLUMNS = 500, 380, 3
MIN_PAGE_INK = 0.02  # share of the page's pixels that are not background
MIN_PAGE_HEIGHT = 400  # pixels down to the last ink: a header alone is shorter
MIN_CELL_INK = 0.005  # an empty plot cell has none


def find_browser(install: bool) -> str | None:
    """A headless-capable Chromium on PATH, installed from Debian's archive first when asked."""
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found or not install:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("installing Debian's chromium (apt-get install -y chromium) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run([*sudo, *command], env=env, check=False).returncode != 0:
            return None
    return shutil.which("chromium")


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> Image.Image:
    """The page rendered in a ``width`` x ``height`` window, as RGB pixels."""
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={png}", page.resolve().as_uri()]
        process = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if process.returncode != 0 or not png.is_file():
        raise SystemExit(f"report_check: {browser} failed ({process.returncode}): {process.stderr[-400:]}")
    with Image.open(png) as image:
        return image.convert("RGB")


def ink(image: Image.Image) -> float:
    """The share of pixels that differ visibly from white."""
    grey = image.convert("L")
    histogram = grey.histogram()
    return sum(histogram[:245]) / (grey.width * grey.height)


def palette_pixels(image: Image.Image) -> int:
    """Pixels within a small distance of one of the plots' colours (black aside: text is black)."""
    targets = [tuple(int(code[i:i + 2], 16) for i in (1, 3, 5)) for code in PALETTE if code != "#000000"]
    colours = image.getcolors(image.width * image.height) or []
    return sum(count for count, pixel in colours
               if any(sum(abs(a - b) for a, b in zip(pixel, target, strict=True)) < 40 for target in targets))


def contact_sheet(html: str, path: Path) -> int:
    """A page holding the report's plots, each at the top left of a fixed cell; their number."""
    plots = re.findall(r"<svg\b.*?</svg>", html, flags=re.DOTALL)
    cells = "".join(f'<div style="position:absolute;left:{CELL_WIDTH * (i % COLUMNS)}px;'
                    f'top:{CELL_HEIGHT * (i // COLUMNS)}px">{plot}</div>' for i, plot in enumerate(plots))
    path.write_text(f'<!DOCTYPE html><html><body style="margin:0;background:#fff">{cells}</body></html>',
                    encoding="utf-8")
    return len(plots)


def check(browser: str, page: Path, work: Path, keep: Path | None) -> list[str]:
    """What is wrong with the rendered page (nothing: an empty list); prints what it measured."""
    problems = []
    whole = screenshot(browser, page, work / "page.png", 1280, 12000)
    box = ImageChops.difference(whole, Image.new("RGB", whole.size, "white")).getbbox()
    height = box[3] if box else 0  # the window is taller than most pages: measure down to the last ink
    page_ink = ink(whole.crop((0, 0, whole.width, height))) if height else 0.0
    print(f"page: {height} px of content, {page_ink:.1%} of its pixels carry ink")
    if height < MIN_PAGE_HEIGHT or page_ink < MIN_PAGE_INK:
        problems.append(f"the page is blank ({height} px of content, {page_ink:.2%} ink)")
    count = contact_sheet(page.read_text(encoding="utf-8"), work / "plots.html")
    if count:
        rows = -(-count // COLUMNS)
        sheet = screenshot(browser, work / "plots.html", work / "plots.png", CELL_WIDTH * COLUMNS,
                           CELL_HEIGHT * rows)
        blank = [index + 1 for index in range(count)
                 if ink(sheet.crop(((index % COLUMNS) * CELL_WIDTH, (index // COLUMNS) * CELL_HEIGHT,
                                    (index % COLUMNS + 1) * CELL_WIDTH,
                                    (index // COLUMNS + 1) * CELL_HEIGHT))) < MIN_CELL_INK]
        coloured = palette_pixels(sheet)
        print(f"plots: {count} rendered, {count - len(blank)} with ink, {coloured} pixels in plot colours")
        if blank:
            problems.append(f"plot(s) {', '.join(map(str, blank))} of {count} rendered blank")
        if coloured < 50:
            problems.append("no plot drew a curve, bar or point in the plots' colours")
    if keep is not None:
        view = screenshot(browser, page, work / "view.png", 1280, 1800)
        view = view.resize((960, 1350), Image.Resampling.LANCZOS).quantize(64)
        keep.parent.mkdir(parents=True, exist_ok=True)
        view.save(keep, optimize=True)
        print(f"screenshot: {keep} ({keep.stat().st_size // 1024} KiB)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="run, eval or compare directory, or a report .html")
    parser.add_argument("--install", action="store_true", help="apt-get install chromium when missing")
    parser.add_argument("--screenshot", type=Path, help="also save the top of the page as this PNG")
    args = parser.parse_args()
    browser = find_browser(args.install)
    if browser is None:
        print("report_check: no Chromium found (pass --install on Debian, or install chromium)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        page = args.source if args.source.is_file() else write_report(args.source, work / "report.html")
        print(f"rendering {page} with {browser}")
        problems = check(browser, page, work, args.screenshot)
    for problem in problems:
        print(f"report_check: FAIL: {problem}", file=sys.stderr)
    if not problems:
        print("report_check: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
