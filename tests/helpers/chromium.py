"""Headless Debian Chromium for the browser tests and benchmarks/report_browser.py: where it is, how it is
started (offline, no sandbox in containers) and playwright's sync API (None when it is not installed; it is
never used to download a browser: `playwright install` is not run)."""

from __future__ import annotations

import shutil
from pathlib import Path

#: the Debian chromium executable, None when absent (apt-get install chromium)
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
#: command-line switches: headless, offline, no first-run work
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    PlaywrightError = Exception
    sync_playwright = None


def skip_without_chromium() -> None:
    """Skip the calling test when playwright or the Debian chromium is missing, saying which."""
    import pytest

    if sync_playwright is None:
        pytest.skip("python playwright is not installed (pip install playwright; never `playwright install`)")
    if CHROMIUM is None:
        pytest.skip("Debian chromium not found (apt-get install chromium)")
