#!/usr/bin/env bash
# Installs every system package Ember's build, demo, tests and benchmarks use.
# Safe to run repeatedly; only missing packages are installed.
set -euo pipefail

PKGS=(
  runc                # the OCI runtime Ember drives
  docker-registry     # CNCF distribution registry: test upstream and benchmark peer
  skopeo umoci        # peers and fixture tools (never on Ember's pull path)
  podman              # benchmark peer
  containerd          # ctr: a real client of the cache in its tests
  nginx-light         # static-file baseline in the cache benchmark
  busybox-static      # contents of the fixture images
  debootstrap         # the Debian root filesystem of the `debian` fixture
  libc6-dev           # libc.a for the statically linked exec agent
  hyperfine           # repeated timing in benchmarks
  time                # /usr/bin/time: CPU seconds in the directory-cache benchmark
  iproute2 jq curl    # test and benchmark plumbing
  util-linux          # nsenter: the partition test's processes in their network namespaces
  apache2-utils       # htpasswd (bcrypt) for the registry auth tests
  openssl             # certificates and JWT signatures for the token-auth test
  python3             # the token server of the bearer-auth tests (ember-testkit/token_server.py)
  postgresql          # the control plane's PostgreSQL store: tests start private servers from its binaries
  python3-venv        # the virtualenv schemathesis (the API fuzzer) is installed into
  chromium            # the dashboard's browser test (driven by playwright-core, scripts/install-playwright.sh)
  ca-certificates
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node.js and npm (the real `turbo` client, the dashboard's browser test):
# Debian's packages only when no npm is there yet, because machines of
# this kind ship NodeSource's nodejs, which bundles npm and conflicts with
# Debian's npm package.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: nodejs npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# CRIU 4.1.1 for snapshot/restore, from Debian trixie through its own loader
# (bookworm's 3.17 fails `criu check` on this kind of kernel); skipped when
# already installed, probed with `criu check` either way.
if [ "$(id -u)" -eq 0 ]; then
  "$(dirname "$0")/install-criu.sh"
else
  sudo "$(dirname "$0")/install-criu.sh"
fi

# The `debian` fixture's root filesystem, built once from apt's Debian mirror
# and cached (see the script).
"$(dirname "$0")/debian-rootfs.sh" >/dev/null

# The control plane's API-agreement test runs schemathesis (from PyPI,
# pinned) out of /opt/ember-venv.
"$(dirname "$0")/install-schemathesis.sh"

# The dashboard's browser test drives Debian's chromium with playwright-core
# (from npm, pinned) out of /opt/ember-playwright.
"$(dirname "$0")/install-playwright.sh"

# The cache's Turborepo API test runs the real `turbo` (from npm, pinned)
# out of /opt/ember-turbo.
"$(dirname "$0")/install-turbo.sh" >/dev/null
