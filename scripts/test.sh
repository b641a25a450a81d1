#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: formatting, lints, build,
# then every test (unit, and integration tests against a real
# docker-registry, real runc, real overlayfs, skopeo and umoci).
# Needs root (overlayfs, namespaces, runc).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# Some tests drive the built binaries (the CLI kill -9 test, runners that
# bind-mount the static exec agent), so build them first.
cargo build --workspace
crates/ember-agent/build-static.sh >/dev/null
# --no-fail-fast: one failing test binary should not hide the results of the rest.
cargo test --workspace --no-fail-fast
