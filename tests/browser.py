"""A page as a person sees it: Debian's Chromium, headless, driven by Playwright (which
reports what the console says and what failed to load; `chromium --screenshot` alone does
not). Playwright's own browser downloads are not used: it launches the system's chromium.

`make test` installs chromium where it is missing (as root); elsewhere, without it, the
tests that need it skip, unless HRNET_REQUIRE_INFRA_TOOLS is set (CI), where they fail.
"""
import os
import shutil
from typing import Any, Dict

import pytest

# What the page holds once drawn: each figure's size, each image's decoded width (0: it
# did not load), each table's rows, and whether anything is wider than the window.
INSPECT = """() => ({
  figures: [...document.querySelectorAll('figure[id]')].map(f => {
    const box = f.querySelector('svg').getBoundingClientRect();
    return {id: f.id, width: box.width, height: box.height};
  }),
  images: [...document.images].map(i => i.naturalWidth),
  tables: Object.fromEntries([...document.querySelectorAll('table[id]')].map(t => [t.id, t.rows.length])),
  overflow: document.documentElement.scrollWidth > window.innerWidth,
  text: document.body.innerText,
})"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("HRNET_REQUIRE_INFRA_TOOLS"):
            pytest.fail("chromium is missing: `make test` installs Debian's package (as root)")
        pytest.skip("no chromium (Debian's package; `make test` installs it as root)")
    return path


def render(html_path: str, screenshot: str, width: int = 1280) -> Dict[str, Any]:
    """Open ``html_path`` in headless Chromium: INSPECT's findings, plus ``problems`` (console
    errors and warnings, script errors, failed loads) and the full-page ``screenshot``."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url[:80]}"))
            page.goto("file://" + os.path.abspath(html_path), wait_until="load")
            found = page.evaluate(INSPECT)
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    return dict(found, problems=problems)
