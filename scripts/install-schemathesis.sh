#!/usr/bin/env bash
# Installs schemathesis (a property-based OpenAPI fuzzer, from PyPI) into its
# own virtualenv, for the control plane's API-agreement test
# (crates/ember/tests/api_fuzz_cli.rs). Pinned, so every machine fuzzes with
# the same generator. Safe to run repeatedly.
set -euo pipefail

VERSION=4.32.5
VENV=${EMBER_VENV:-/opt/ember-venv}

if [ -x "$VENV/bin/schemathesis" ] && "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$VERSION"; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Debian's python3 (python3-venv is in install-deps.sh's list).
$SUDO /usr/bin/python3 -m venv "$VENV"
$SUDO "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
"$VENV/bin/schemathesis" --version
