#!/usr/bin/env bash
# Installs Turborepo's `turbo` client (from the npm registry, pinned) into
# /opt/ember-turbo, for the cache's Turborepo remote-cache API test
# (crates/ember-cache/tests/turbo.rs). Safe to run repeatedly.
set -euo pipefail

VERSION=2.11.11
PREFIX=${EMBER_TURBO_PREFIX:-/opt/ember-turbo}
BIN=$PREFIX/node_modules/.bin/turbo

if [ -x "$BIN" ] && [ "$("$BIN" --version 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO mkdir -p "$PREFIX"
# nodejs and npm are in install-deps.sh's list.
$SUDO npm install --prefix "$PREFIX" --no-audit --no-fund --silent "turbo@$VERSION"
"$BIN" --version
