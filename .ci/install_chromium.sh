#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the report's layout test
# (tests/test_report_page.py opens the report and the front page and measures where the title and
# the summary table land; it is skipped without a browser). Idempotent and quiet: exits 0 at once
# when chromium is already on PATH. Needs root (or sudo) and apt-get.
set -euo pipefail

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "install_chromium: needs root or sudo" >&2; exit 1
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "install_chromium: needs apt-get (Debian/Ubuntu)" >&2; exit 1
fi

APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"
$APT update -qq >/dev/null
$APT install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  chromium >/dev/null
command -v chromium >/dev/null || { echo "install_chromium: chromium missing after the install" >&2; exit 1; }
