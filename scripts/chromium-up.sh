#!/usr/bin/env bash
# chromium-up.sh - Debian's chromium for the browser tests (tests/test_mlflow_ui.py); idempotent.
#
# Installs the `chromium` package when no chromium binary is on PATH, then checks that it starts headless.
# Exit 0 = usable (its path on stdout); non-zero = one line on stderr saying why (the tests then skip with it).
# Knobs: DANET_APT_LOCK_TIMEOUT  seconds apt-get may wait for the dpkg lock (default 600: the Slurm setup may
# hold it at the same time). Installing goes through scripts/apt-install.sh (it also finishes an interrupted dpkg).
set -euo pipefail

LOG=/tmp/danet-chromium-apt.log
. "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh"
say() { echo "chromium-up: $*" >&2; }
die() { echo "chromium-up: error: $*" >&2; exit 1; }
t0=$(date +%s)

find_bin() { command -v chromium || command -v chromium-browser || true; }
bin=$(find_bin)
if [ -z "$bin" ]; then
  command -v apt-get >/dev/null 2>&1 || die "chromium is not installed and there is no apt-get to install it"
  [ "$(id -u)" = 0 ] || die "chromium is not installed and installing it needs root (apt-get install chromium)"
  say "installing Debian's chromium (apt-get; log $LOG)"
  apt_install "$LOG" chromium fonts-dejavu-core || die "apt-get could not install chromium (log: $LOG)"
  bin=$(find_bin)
  [ -n "$bin" ] || die "the chromium package installed no chromium binary"
  say "installed in $(( $(date +%s) - t0 )) s"
fi

# A headless start proves the libraries are all there (root needs --no-sandbox: no user namespaces here).
if ! out=$(timeout 60 "$bin" --headless --no-sandbox --disable-gpu --dump-dom 'data:text/html,<p>ok</p>' 2>&1); then
  die "$bin does not start headless: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
fi
echo "$out" | grep -q '<p>ok</p>' || die "$bin started but rendered nothing"
echo "$bin"
