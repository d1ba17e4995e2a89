#!/usr/bin/env bash
# Run every test: fetch the real model (SmolLM2-135M-Instruct Q4_1, sha256-checked) so the
# tests that need it run, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
cargo test --all-targets "$@"
cargo test --doc
