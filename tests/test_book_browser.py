"""Every page of a built book, opened in a real headless Chromium (Playwright): no clipped table, no broken image or
video, no console error, no error output, and the figures each chapter promises (tests/browser_check.py). A
full-page screenshot of every page is kept under data/<run>/book/screenshots/ (a CI artefact).

`pytest tests/test_book_browser.py -q`   (the checker on small pages; the smoke book is checked by test_pipeline_smoke)
`REFINEVLA_BOOK=data/default/book pytest tests/test_book_browser.py -q`   (any built book folder)

Chromium is the system one (/usr/bin/chromium) or $REFINEVLA_CHROMIUM; Playwright is the Python package only.
"""
import os
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")

from browser_check import CHECK_PAGE, check_book, check_page, chromium, launch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def book_dir():
    """A built book folder: $REFINEVLA_BOOK. Without it the whole-book check is left to
    tests/test_pipeline_smoke.py, which builds the smoke book once and opens every page of it."""
    env = os.environ.get("REFINEVLA_BOOK")
    if not env:
        pytest.skip("set REFINEVLA_BOOK=data/<run>/book to check a built book (the smoke book: test_pipeline_smoke)")
    folder = (REPO / env).resolve()
    if not (folder / "_build" / "html" / "index.html").exists():
        pytest.fail(f"REFINEVLA_BOOK={env}: no built book in {folder}")
    return folder


@pytest.fixture(scope="module")
def exe():
    found = chromium()
    if found is None:
        pytest.skip("no Chromium: install it (apt-get install chromium) or set REFINEVLA_CHROMIUM")
    return found


@pytest.mark.slow
def test_every_page_reads_in_a_browser(book_dir, exe):
    failures = check_book(book_dir, exe)
    assert not failures, "\n".join(failures)
    shots = list((book_dir / "screenshots").glob("*.png"))
    assert len(shots) >= 8 and min(p.stat().st_size for p in shots) > 5000


def test_the_check_catches_a_clipped_table_a_broken_image_and_a_console_error(exe, tmp_path):
    """The same checks on hand-made pages: a wide table outside a scroll box, an image that cannot load and a script
    error are reported; the same table inside an overflow-x: auto box is not."""
    from playwright.sync_api import sync_playwright

    cells = "".join(f"<td>column {i} with a long header</td>" for i in range(30))
    (tmp_path / "bad.html").write_text(
        f"<html><body><article style='width:600px;overflow:hidden'><table><tr>{cells}</tr></table>"
        "<img src='missing.png'></article><script>undefinedFunction()</script></body></html>")
    (tmp_path / "good.html").write_text(
        f"<html><body><article style='width:600px'><div style='overflow-x:auto'><table><tr>{cells}</tr></table>"
        "</div></article></body></html>")
    with sync_playwright() as p:
        browser = launch(p, exe)
        bad = check_page(browser, (tmp_path / "bad.html").as_uri(), tmp_path / "bad.png")["problems"]
        good = check_page(browser, (tmp_path / "good.html").as_uri())["problems"]
        browser.close()
    assert any("clipped" in p for p in bad) and any("broken image" in p for p in bad)
    assert any("console error" in p and "undefinedFunction" in p for p in bad)
    assert good == [] and (tmp_path / "bad.png").stat().st_size > 1000
    assert "scrollWidth" in CHECK_PAGE
