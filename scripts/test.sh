#!/usr/bin/env bash
# Formatting, lints and every test of the workspace, as CI runs them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\033[1m[test %s]\033[0m %s\n' "$(date +%T)" "$*" >&2; }

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
say "cargo build (every test target)"
cargo build --workspace --all-targets
say "cargo test"
cargo test --workspace "$@"
say "every test passed"
