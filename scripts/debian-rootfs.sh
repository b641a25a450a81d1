#!/usr/bin/env bash
# Builds, once, the root filesystem of a real Debian bookworm image as a
# layer tar: `debootstrap --variant=minbase bookworm` into a temporary
# directory, tarred with numeric owners. The unpack tests compare Ember's
# unpack of it with umoci's (it has the eight character devices in /dev
# that real Debian images carry). Prints the tar's path.
#
# The tar is cached (default /var/cache/ember-test/debian-bookworm-minbase.tar,
# or $EMBER_DEBIAN_TAR), so the tests need the Debian mirror only the first
# time; scripts/install-deps.sh runs this. The mirror is the one apt uses.
#
# `debian-rootfs.sh python` builds the same with Debian's Python 3 and a few
# python3-* libraries added (`--include`), cached as
# debian-bookworm-python.tar (or $EMBER_DEBIAN_PYTHON_TAR): the init-heavy
# image of the snapshot benchmark (fixture `debian-python`).
set -euo pipefail

flavour=${1:-minbase}
include=""
case "$flavour" in
  minbase) out=${EMBER_DEBIAN_TAR:-/var/cache/ember-test/debian-bookworm-minbase.tar} ;;
  python)
    out=${EMBER_DEBIAN_PYTHON_TAR:-/var/cache/ember-test/debian-bookworm-python.tar}
    include=--include=python3,python3-yaml,python3-requests,python3-jinja2,python3-numpy
    ;;
  *) echo "debian-rootfs.sh: unknown flavour $flavour (minbase, python)" >&2; exit 2 ;;
esac
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$(dirname "$out")"

# The first Debian archive URI in apt's sources (deb822 or one-line format).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
  echo "debian-rootfs.sh: no Debian mirror found in apt's sources" >&2
  exit 1
fi

# One builder at a time (tests may start this in parallel).
exec 9>"$out.lock"
flock 9
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
work=$(mktemp -d "$(dirname "$out")/.debootstrap.XXXXXX")
trap 'rm -rf "$work"' EXIT
if ! debootstrap --variant=minbase $include bookworm "$work/root" "$mirror" >"$work/log" 2>&1; then
  tail -n 30 "$work/log" >&2
  echo "debian-rootfs.sh: debootstrap from $mirror failed" >&2
  exit 1
fi
tar --numeric-owner --sort=name -C "$work/root" -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$out"
echo "$out"
