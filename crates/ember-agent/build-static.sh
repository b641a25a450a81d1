#!/usr/bin/env bash
# Builds the statically linked ember-agent (glibc, +crt-static; no musl
# target needed) and prints the binary's path on stdout.
#
# The agent is bind-mounted into containers whose root filesystems have no
# C library, so it must not need one. Explicit --target keeps RUSTFLAGS off
# build scripts and proc-macros, which cannot be static.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=x86_64-unknown-linux-gnu
# Symbols and debug info are stripped: 1.5 MB instead of 6.7 MB.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C strip=symbols" \
  cargo build --release --quiet -p ember-agent --target "$target" >&2
out="${CARGO_TARGET_DIR:-$PWD/target}/$target/release/ember-agent"
test -x "$out"
echo "$out"
