#!/usr/bin/env bash
# Make sure Debian's `chromium` and `chromium-driver` are installed, for the web app's end-to-end
# browser test (tests/serve/test_browser.py, run by `make test`) and for anyone who wants to drive
# `dinov2-serve` from selenium by hand.
#
# Usage: scripts/install_browser.sh          (as root: installs what is missing; otherwise only checks)
# Prints the chromium and chromedriver paths on success.
# Exit status: 0 both present, 3 they cannot be installed here (no apt-get, not root, or apt-get
# failed; the test then skips with this script's message), 2 usage.
#
# Only the two programs and a basic font are installed (--no-install-recommends): the test runs
# chromium headless, so none of its desktop extras are needed. `apt-get update` runs only when the
# first install attempt fails (a fresh machine whose package lists are missing or stale).
set -euo pipefail

CHROMIUM="${DINOV2_CHROMIUM:-/usr/bin/chromium}"
DRIVER="${DINOV2_CHROMEDRIVER:-/usr/bin/chromedriver}"
PACKAGES=(chromium chromium-driver fonts-dejavu-core)

say() { echo "[install_browser] $*" >&2; }
cannot() {
    say "cannot install the browser: $*"
    exit 3
}

if [ "$#" -ne 0 ]; then
    say "usage: $0 (no arguments)"
    exit 2
fi

present() { [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; }

if ! present; then
    command -v apt-get >/dev/null 2>&1 ||
        cannot "apt-get not found: install chromium and its chromedriver yourself (DINOV2_CHROMIUM, DINOV2_CHROMEDRIVER)"
    [ "$(id -u)" -eq 0 ] || cannot "installing Debian packages needs root: run 'sudo $0' once"
    log="$(mktemp -t dinov2-apt.XXXXXX.log)"
    say "installing ${PACKAGES[*]} with apt-get (log: $log)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
        say "apt-get install failed; running apt-get update first"
        apt-get update -q >>"$log" 2>&1 || cannot "apt-get update failed (see $log)"
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1 ||
            cannot "apt-get install ${PACKAGES[*]} failed (see $log)"
    fi
    present || cannot "the packages installed but $CHROMIUM or $DRIVER is still missing (see $log)"
    say "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
fi
echo "$CHROMIUM"
echo "$DRIVER"
