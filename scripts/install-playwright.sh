#!/usr/bin/env bash
# Installs what the dashboard's browser test (crates/ember/tests/observe_cli.rs)
# needs: Debian's chromium, Node.js with npm, and playwright-core from the npm
# registry into its own prefix. playwright-core is the driver only: it never
# downloads a browser; the test points it at /usr/bin/chromium. Pinned to the
# last release that runs on bookworm's Node.js 18. Safe to run repeatedly.
set -euo pipefail

VERSION=1.61.1
PREFIX=${EMBER_PLAYWRIGHT:-/opt/ember-playwright}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v chromium >/dev/null || missing+=(chromium)
# A Node.js from elsewhere (with its own npm) is used as it is.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$PREFIX/node_modules/playwright-core/package.json" ] &&
  grep -q "\"version\": \"$VERSION\"" "$PREFIX/node_modules/playwright-core/package.json"; then
  exit 0
fi
$SUDO mkdir -p "$PREFIX"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $SUDO npm install --prefix "$PREFIX" --no-audit --no-fund \
  --loglevel=error "playwright-core@$VERSION" >/dev/null
echo "playwright-core $VERSION in $PREFIX"
