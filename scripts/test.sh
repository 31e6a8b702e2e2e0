#!/usr/bin/env bash
# Formatting, lints and every test of the workspace, as CI runs them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
say "cargo test"
cargo build --workspace --all-targets
cargo test --workspace "$@"
