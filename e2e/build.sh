#!/usr/bin/env bash
# The build recipe lives in the package so `tidal dev-cluster build` can run it after a pip install.
#
# Before it: promtool (tests/test_dashboards.py checks every dashboard expression with `promtool
# check rules`) from Debian's prometheus package, unpacked without installing it (apt-get
# download + dpkg -x, no root needed) into ${TIDAL_PROMETHEUS_DIR:-~/.cache/tidal/prometheus};
# the package's prometheus binary lands beside it (usr/bin/). Where there is no apt-get, it says
# so and goes on (the test then skips, or fails under TIDAL_E2E=require).
#
# And Debian's chromium-headless-shell (the web view's browser test), installed with apt-get
# when running as root (as CI does) and not already there; otherwise it says so and the test
# skips, or fails under TIDAL_E2E=require.
set -euo pipefail

PROMETHEUS_DIR="${TIDAL_PROMETHEUS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidal/prometheus}"
fetch_promtool() {
  if [ -x "$PROMETHEUS_DIR/usr/bin/promtool" ]; then
    echo "promtool cached: $PROMETHEUS_DIR/usr/bin/promtool"
    return
  fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    echo "no apt-get/dpkg: promtool not fetched (the dashboard expression check skips)" >&2
    return
  fi
  local tmp
  tmp=$(mktemp -d)
  echo "fetching promtool from Debian's prometheus package"
  # A fresh image may have no package lists; as root, read them once and retry.
  if ! (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -q >/dev/null
      (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1)
    else
      echo "apt-get download prometheus failed: promtool not fetched" >&2
      rm -rf "$tmp"
      return
    fi
  fi
  mkdir -p "$PROMETHEUS_DIR"
  dpkg -x "$tmp"/prometheus_*.deb "$PROMETHEUS_DIR"
  rm -rf "$tmp"
  "$PROMETHEUS_DIR/usr/bin/promtool" --version | sed -n 1p
}

install_headless_chromium() {
  if command -v chromium-headless-shell >/dev/null; then
    echo "chromium-headless-shell present: $(command -v chromium-headless-shell)"
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not root or no apt-get: chromium-headless-shell not installed (the browser test skips)" >&2
    return
  fi
  echo "installing Debian's chromium-headless-shell"
  local install=(apt-get install -y -q --no-install-recommends chromium-headless-shell)
  if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
  fi
  chromium-headless-shell --version
}

fetch_promtool
install_headless_chromium
exec "$(dirname "$0")/../tidal/devcluster/build.sh" "$@"
