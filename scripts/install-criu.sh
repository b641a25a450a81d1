#!/usr/bin/env bash
# Installs CRIU 4.1.1 (Debian trixie's package) for Ember's snapshot/restore,
# and probes it with `criu check`.
#
# Why not apt: Debian bookworm's criu (3.17) fails `criu check` on this kind
# of kernel (vDSO). Trixie's 4.1.1 works, but it is linked against a glibc
# newer than the host's, so it runs through its own loader:
#   1. `debootstrap --variant=minbase trixie $EMBER_CRIU_ROOT` (default
#      /opt/ember-criu), from the Debian mirror apt already uses;
#   2. `apt-get install criu` inside it (chroot);
#   3. a wrapper `/usr/local/sbin/criu` (or $EMBER_CRIU_WRAPPER) that runs
#      ROOT/usr/sbin/criu through ROOT's ld-linux with ROOT's libraries.
# The host's runc finds the wrapper on PATH and drives it as usual. About
# 400 MB and a minute on a fresh machine; skipped when a working criu of this
# version is already on the PATH.
#
# CRIU probes kernel features on every start (≈50 ms) unless it finds its
# cache /run/criu.kdat, which it only writes when /run is a tmpfs. When /run
# is not one, this script writes the cache once from a private mount
# namespace with a tmpfs on /run, so that restores here skip the probe too
# (`criu check` shows it: "Loaded kdat cache from /run/criu.kdat" in the log).
set -euo pipefail

want=4.1.1
root=${EMBER_CRIU_ROOT:-/opt/ember-criu}
wrapper=${EMBER_CRIU_WRAPPER:-/usr/local/sbin/criu}

have_version() {
  "$1" --version 2>/dev/null | awk '/^Version:/ { print $2 }'
}

# Seeds /run/criu.kdat when CRIU itself will not keep it (see above).
seed_kdat() {
  local criu=$1
  [ -s /run/criu.kdat ] && return 0
  if [ "$(stat -f -c %T /run)" = tmpfs ]; then
    "$criu" check >/dev/null 2>&1 || true
    return 0
  fi
  local tmp
  tmp=$(mktemp -d /tmp/ember-kdat.XXXXXX)
  # In a private mount namespace /run is an empty tmpfs, so CRIU keeps the
  # cache there; it is copied out through /tmp (outside that tmpfs).
  unshare -m sh -c "mount --make-rprivate / && mount -t tmpfs ember-kdat /run \
    && '$criu' check >/dev/null 2>&1; cp /run/criu.kdat '$tmp/' 2>/dev/null" || true
  if [ -s "$tmp/criu.kdat" ]; then
    install -m 0600 "$tmp/criu.kdat" /run/criu.kdat
  else
    echo "install-criu.sh: could not write /run/criu.kdat; restores will probe the kernel each time (~50 ms)" >&2
  fi
  rm -rf "$tmp"
}

probe() {
  local criu=$1 out
  if out=$("$criu" check 2>&1); then
    echo "criu $(have_version "$criu"): ${out##*$'\n'}"
  else
    echo "$out" >&2
    echo "install-criu.sh: '$criu check' failed" >&2
    return 1
  fi
}

if [ "$(id -u)" -ne 0 ]; then
  echo "install-criu.sh: must run as root (debootstrap, chroot, /usr/local/sbin)" >&2
  exit 1
fi

existing=$(command -v criu || true)
if [ -n "$existing" ] && [ "$(have_version "$existing")" = "$want" ] && "$existing" check >/dev/null 2>&1; then
  seed_kdat "$existing"
  probe "$existing"
  exit 0
fi

# The first Debian archive URI in apt's sources (deb822 or one-line format),
# as scripts/debian-rootfs.sh finds it.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

for tool in debootstrap chroot unshare; do
  command -v "$tool" >/dev/null || {
    echo "install-criu.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2
    exit 1
  }
done
# debootstrap knows trixie from bookworm's own package onwards (1.0.128+).
[ -e /usr/share/debootstrap/scripts/trixie ] || {
  echo "install-criu.sh: this debootstrap does not know trixie" >&2
  exit 1
}

# One installer at a time.
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9

if [ ! -x "$root/usr/sbin/criu" ] || [ "$(have_version "$root/usr/sbin/criu" 2>/dev/null)" != "$want" ]; then
  work="$root.tmp"
  rm -rf "$work"
  log=$(mktemp /tmp/install-criu.XXXXXX.log)
  echo "install-criu.sh: debootstrap trixie into $root from $mirror (about a minute)"
  if ! debootstrap --variant=minbase trixie "$work" "$mirror" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install-criu.sh: debootstrap trixie from $mirror failed (log: $log)" >&2
    exit 1
  fi
  if ! chroot "$work" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq criu' >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install-criu.sh: apt-get install criu inside the trixie root failed (log: $log)" >&2
    exit 1
  fi
  rm -rf "$root"
  mv "$work" "$root"
  rm -f "$log"
fi

got=$("$root/usr/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" \
  "$root/usr/sbin/criu" --version 2>/dev/null | awk '/^Version:/ { print $2 }')
if [ "$got" != "$want" ]; then
  echo "install-criu.sh: trixie's criu is version '$got', expected $want" >&2
  exit 1
fi

mkdir -p "$(dirname "$wrapper")"
cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# CRIU $want from Debian trixie (scripts/install-criu.sh): its glibc is newer
# than the host's, so it runs through the loader and libraries of $root.
exec $root/usr/lib64/ld-linux-x86-64.so.2 --library-path $root/usr/lib/x86_64-linux-gnu $root/usr/sbin/criu "\$@"
EOF
chmod 0755 "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"

seed_kdat "$wrapper"
probe "$wrapper"
