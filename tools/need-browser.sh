#!/usr/bin/env bash
# The trainer dashboard test drives Debian's headless Chromium through selenium, and `make test` must never pass with
# that check skipped. Installs chromium + chromium-driver where this machine allows it (root with apt-get); anywhere
# else it fails with the one command to run.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[need-browser] installing chromium + chromium-driver (the dashboard test's headless browser)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  exit 0
fi
echo "make test needs Debian's headless Chromium for the dashboard check; install it with:" >&2
echo "    sudo apt-get install -y chromium chromium-driver" >&2
exit 1
