#!/usr/bin/env bash
# The test command: installs what is missing (tests/bootstrap.sh --test), then runs every
# test with the Python clients of target/pyenv first on PATH. Extra arguments go to
# `cargo test` (e.g. a test name filter: `tests/run.sh upgrade`).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/bootstrap.sh --test
export PATH="$PWD/target/pyenv/bin:$PATH"
exec cargo test --workspace --locked "$@"
