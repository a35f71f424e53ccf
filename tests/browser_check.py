"""Open every page of a built Jupyter Book in headless Chromium (Playwright) and list what a reader would see
wrong: clipped tables, broken images or videos, console errors, error outputs, chapters with fewer figures than
they promise. Saves a full-page screenshot of every page under <book folder>/screenshots/.

Used by tests/test_book_browser.py; any test that has built a book can call ``check_book(run_dir / "book")``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The least number of figures (images in cell outputs) each chapter shows.
MIN_FIGURES = {"00_overview": 2, "01_data": 3, "02_annotate": 1, "03_finetune": 1, "04_evaluate": 2,
               "05_attention": 2, "06_results": 1}

# Runs in the page: the problems a reader would see.
CHECK_PAGE = """() => {
  const problems = [];
  const article = document.querySelector('article') || document.querySelector('main') || document.body;
  const right = article.getBoundingClientRect().right;
  const scrolls = (el) => {
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o === 'auto' || o === 'scroll') return true;
    }
    return false;
  };
  document.querySelectorAll('table').forEach((t, i) => {
    const r = t.getBoundingClientRect();
    const wider = r.right > right + 1 || t.scrollWidth > t.clientWidth + 1;
    if (wider && !scrolls(t)) problems.push(`table ${i} is clipped (right edge ${Math.round(r.right)} > ${Math.round(right)})`);
  });
  document.querySelectorAll('img').forEach((img) => {
    if (!img.complete || img.naturalWidth === 0) problems.push(`broken image ${(img.getAttribute('src') || '').slice(0, 80)}`);
  });
  document.querySelectorAll('video').forEach((v) => {
    if (v.error || v.readyState === 0) problems.push(`broken video ${(v.currentSrc || '').slice(0, 80)}`);
  });
  document.querySelectorAll('.cell_output .output.traceback, .cell_output .output.error').forEach(() =>
    problems.push('an error output'));
  return {problems, figures: document.querySelectorAll('.cell_output img').length};
}"""


def chromium() -> str | None:
    """The browser: $REFINEVLA_CHROMIUM, else the system Chromium (no Playwright browser download)."""
    exe = (os.environ.get("REFINEVLA_CHROMIUM") or shutil.which("chromium") or shutil.which("google-chrome")
           or "/usr/bin/chromium")
    return exe if Path(exe).exists() else None


def pages(html: Path) -> list[Path]:
    """Every page of the book (the site's own search and index pages and the index.html redirect aside)."""
    skip = {"search.html", "genindex.html"}
    return sorted(p for p in Path(html).rglob("*.html") if p.name not in skip and "_static" not in p.parts
                  and "_sources" not in p.parts and "reports" not in p.parts
                  and 'http-equiv="refresh"' not in p.read_text(errors="replace")[:2000].lower())


#: milliseconds any one browser step may take (launch, load, check, screenshot) before it fails, naming page and step
STEP_TIMEOUT_MS = 60_000
#: a closed network: without these Chromium keeps retrying background connections (updates, sync, QUIC) on this
#: machine, and a headless Chromium as root needs --no-sandbox
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _step(what: str, url: str, call):
    """Run one browser step; a timeout or a crash fails with one line naming the step and the page."""
    try:
        return call()
    except Exception as e:  # playwright's TimeoutError and Error
        raise RuntimeError(f"browser step '{what}' failed on {url}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def launch(playwright, exe: str):
    """Headless Chromium for the checks, started within STEP_TIMEOUT_MS or failing with a message."""
    return _step("launch", exe, lambda: playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS,
                                                                   timeout=STEP_TIMEOUT_MS))


def check_page(browser, url: str, screenshot: Path | None = None) -> dict:
    """{"problems": [...], "figures": n} for one page (console errors included)."""
    page = _step("new page", url, lambda: browser.new_page(viewport={"width": 1280, "height": 900}))
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    _step("load", url, lambda: page.goto(url, wait_until="load", timeout=STEP_TIMEOUT_MS))
    result = _step("check", url, lambda: page.evaluate(CHECK_PAGE))
    if screenshot is not None:
        _step("screenshot", url, lambda: page.screenshot(path=str(screenshot), full_page=True,
                                                         timeout=STEP_TIMEOUT_MS))
    page.close()
    result["problems"] += [f"console error: {e}" for e in errors]
    return result


def check_book(book_dir, exe: str | None = None) -> list[str]:
    """Every page of data/<run>/book/_build/html checked; returns the failures ("" list = all good)."""
    from playwright.sync_api import sync_playwright

    book_dir = Path(book_dir)
    html = book_dir / "_build" / "html"
    shots = book_dir / "screenshots"
    shots.mkdir(exist_ok=True)
    found = pages(html)
    failures = [f"chapter missing from the book: {n}" for n in sorted(set(MIN_FIGURES) - {p.stem for p in found})]
    exe = exe or chromium()
    if exe is None:
        raise RuntimeError("no Chromium: install it (apt-get install chromium) or set REFINEVLA_CHROMIUM")
    with sync_playwright() as p:  # playwright gives each launch a fresh temporary profile
        browser = launch(p, exe)
        for path in found:
            rel = path.relative_to(html)
            result = check_page(browser, path.as_uri(),
                                shots / (str(rel.with_suffix("")).replace(os.sep, "__") + ".png"))
            if path.stem in MIN_FIGURES and result["figures"] < MIN_FIGURES[path.stem]:
                result["problems"].append(f"{result['figures']} figures, expected at least {MIN_FIGURES[path.stem]}")
            failures += [f"{rel}: {problem}" for problem in result["problems"]]
        browser.close()
    return failures
