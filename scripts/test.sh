#!/usr/bin/env bash
# Run every test: fetch the real model (SmolLM2-135M-Instruct Q4_1, sha256-checked) so the
# tests that need it run, install headless Chromium (Debian's package) for the report's
# browser test when it is missing, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
        >/dev/null 2>&1 || echo "warning: could not install chromium; the browser test will skip" >&2
fi
# Build first, then run: the two take minutes each, and CI's log times them apart.
cargo test --all-targets --no-run "$@"
cargo test --all-targets "$@"
cargo test --doc
