"""Regenerates docs/a1111-tab.png: the privdiff tab in a real AUTOMATIC1111 webui, shot by headless chromium.

  A1111_PATH=/path/to/stable-diffusion-webui python docs/a1111_screenshot.py [--url URL] [--out FILE]

Without ``--url`` it starts the webui as the integration tests do (tests/a1111_webui.py: a temporary data
folder with privdiff installed, its tab first, a tiny random checkpoint) and stops it afterwards. With
``--url`` it shoots a webui that is already running (its privdiff tab must be the first tab: Settings →
User interface → UI tab order).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shoot(url: str, out: Path, size: str = "1400,1000") -> None:
    """Load ``url`` in headless chromium and save a PNG of the window."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("a1111_screenshot: no chromium found (Debian: apt install chromium)")
    with tempfile.TemporaryDirectory(prefix="privdiff-shot-") as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=30000",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running webui (default: start one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "a1111-tab.png")
    args = parser.parse_args()
    if args.url:
        shoot(args.url, args.out)
        return
    spec = importlib.util.spec_from_file_location("a1111_webui", ROOT / "tests" / "a1111_webui.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    if harness.webui_path() is None:
        sys.exit("a1111_screenshot: set A1111_PATH to a stable-diffusion-webui checkout, or pass --url")
    with tempfile.TemporaryDirectory(prefix="privdiff-a1111-") as data:
        harness.prepare(Path(data))
        webui = harness.WebUI(Path(data))
        try:
            shoot(webui.url, args.out)
        finally:
            webui.stop()
    print(args.out)


if __name__ == "__main__":
    main()
