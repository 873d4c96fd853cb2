#!/usr/bin/env bash
# The build recipe lives in the package so `tidal dev-cluster build` can run it after a pip install.
exec "$(dirname "$0")/../tidal/devcluster/build.sh" "$@"
