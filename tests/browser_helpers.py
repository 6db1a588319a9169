"""Open an HTML page in headless Chromium and read where elements landed (tests of the report's layout).

A copy of the page gets a script that, once the page has rendered, writes the bounding boxes of
the report's title and its summary table (``getBoundingClientRect``, window coordinates) into the
DOM; ``chromium --dump-dom`` prints that DOM.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "no chromium on PATH (Debian: apt-get install chromium, or .ci/install_chromium.sh)"

PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const pick = (sel, text) => [...document.querySelectorAll(sel)].find(e => !text || e.textContent.includes(text));
  const box = e => { if (!e) return null; const r = e.getBoundingClientRect();
                     return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; };
  const out = {width: innerWidth, height: innerHeight,
               title: box(pick("h1", "ncrobust")), summary: box(pick("table.ncrobust-summary"))};
  const pre = document.createElement("pre");
  pre.id = "ncrobust-layout";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 1000));
</script>"""


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--virtual-time-budget=8000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def layout(page: str | Path, width: int, height: int, workdir: str | Path) -> dict:
    """The window size and the boxes of the title (the first ``h1`` naming ncrobust) and the
    summary table (``table.ncrobust-summary``) of ``page`` opened at ``width`` x ``height``."""
    text = Path(page).read_text()
    probed = Path(workdir) / f"probed-{width}x{height}-{Path(page).name}"
    head, tag, tail = text.rpartition("</body>")  # the last one: a report's scripts may hold the string too
    probed.write_text(head + PROBE + tag + tail if tag else text + PROBE)
    proc = _chromium(f"--window-size={width},{height}", "--dump-dom", probed.resolve().as_uri())
    found = re.search(r'<pre id="ncrobust-layout">(.*?)</pre>', proc.stdout, re.S)
    if not found:
        raise AssertionError(f"chromium recorded no layout for {page}:\n{proc.stderr[-2000:]}")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(page: str | Path, width: int, height: int, png: str | Path) -> None:
    """A screenshot of ``page`` at ``width`` x ``height`` (to look at what a reader sees)."""
    _chromium(f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}", Path(page).resolve().as_uri())
