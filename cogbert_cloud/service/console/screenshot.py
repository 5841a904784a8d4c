"""A screenshot of the console, taken by headless Chromium (the demo puts one in its report).

Chromium's own ``--screenshot`` mode: no Playwright, nothing downloaded. The page signs in
from its URL fragment (``#tab=rollout&token=...``), which never reaches the server; the token
is on Chromium's command line for the few seconds it runs, so use a read token of a local
service (the demo's), not an operator's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "screenshot"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def find_chromium() -> str | None:
    """``COGBERT_CHROMIUM``, else the first Chromium or Chrome on PATH."""
    if os.environ.get("COGBERT_CHROMIUM"):
        return os.environ["COGBERT_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def screenshot(url: str, token: str, out: Path, *, tab: str = "rollout", width: int = 1400, height: int = 1000,
               timeout: float = 90.0) -> Path | None:
    """Write a PNG of the console at ``url`` (the API's base URL), signed in with ``token``, on
    ``tab``. Returns the file, or None when no Chromium is installed or it failed (a report
    without a picture is still a report)."""
    exe = find_chromium()
    if exe is None:
        return None
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cogbert-chromium-") as profile:
        args = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                # Virtual time runs the page's script and waits for its fetches before the shot.
                "--virtual-time-budget=8000", f"--screenshot={out}",
                f"{url.rstrip('/')}/console#tab={tab}&token={token}"]
        try:
            subprocess.run(args, capture_output=True, timeout=timeout, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
    return out if out.exists() and out.stat().st_size > 0 else None
