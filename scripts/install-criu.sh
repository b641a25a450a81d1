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
# 420 MB and a minute or two on a fresh machine. Idempotent: the trixie root
# is kept when it already holds this version (the wrapper is rewritten, it
# is cheap), and a CRIU of this version installed some other way is used as
# it is.
#
# CRIU probes kernel features on every start (≈50 ms) unless it finds its
# cache /run/criu.kdat, which it only writes when /run is a tmpfs, and which
# it never checks against the running kernel. Where /run is not a tmpfs (as
# here) the wrapper writes the cache itself, once per boot, from a private
# mount namespace with a tmpfs on /run, and tags it with the boot id, so a
# cache left from before a reboot (perhaps of another kernel) is replaced,
# never used. `criu check -v4 -o LOG` then logs "Loaded kdat cache".
set -euo pipefail

want=4.1.1
root=${EMBER_CRIU_ROOT:-/opt/ember-criu}
wrapper=${EMBER_CRIU_WRAPPER:-/usr/local/sbin/criu}

# The version a criu command prints (all arguments are the command).
have_version() {
  "$@" --version 2>/dev/null | awk '/^Version:/ { print $2 }'
}

# trixie's criu through its own loader.
private_criu() {
  "$root/usr/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" \
    "$root/usr/sbin/criu" "$@"
}

probe() {
  local out
  if out=$("$1" check 2>&1); then
    echo "criu $(have_version "$1") at $1: ${out##*$'\n'}"
  else
    echo "$out" >&2
    echo "install-criu.sh: '$1 check' failed" >&2
    return 1
  fi
}

if [ "$(id -u)" -ne 0 ]; then
  echo "install-criu.sh: must run as root (debootstrap, chroot, /usr/local/sbin)" >&2
  exit 1
fi

existing=$(command -v criu || true)
if [ -n "$existing" ] && [ "$existing" != "$wrapper" ] &&
  [ "$(have_version "$existing")" = "$want" ] && "$existing" check >/dev/null 2>&1; then
  probe "$existing"
  exit 0
fi

# One installer at a time.
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9

if [ ! -x "$root/usr/sbin/criu" ] || [ "$(have_version private_criu)" != "$want" ]; then
  for tool in debootstrap chroot unshare; do
    command -v "$tool" >/dev/null || {
      echo "install-criu.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2
      exit 1
    }
  done
  # debootstrap knows trixie from bookworm's own package onwards.
  [ -e /usr/share/debootstrap/scripts/trixie ] || {
    echo "install-criu.sh: this debootstrap does not know trixie" >&2
    exit 1
  }
  # The first Debian archive URI in apt's sources (deb822 or one-line
  # format), as scripts/debian-rootfs.sh finds it.
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

  work="$root.tmp"
  rm -rf "$work"
  log=$(mktemp /tmp/install-criu.XXXXXX.log)
  echo "install-criu.sh: debootstrap trixie into $root from $mirror (a minute or two)"
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
  got=$(have_version private_criu)
  if [ "$got" != "$want" ]; then
    echo "install-criu.sh: trixie's criu is version '$got', expected $want" >&2
    exit 1
  fi
fi

# The wrapper: paths first, then a fixed body (quoted here-documents, so
# nothing in it is expanded now).
mkdir -p "$(dirname "$wrapper")"
{
  echo '#!/bin/sh'
  echo "# CRIU $want from Debian trixie (scripts/install-criu.sh): its glibc is newer"
  echo "# than the host's, so it runs through the loader and libraries of its root."
  echo "R=$root"
  if [ "$(stat -f -c %T /run)" != tmpfs ]; then
    cat <<'EOF'
# /run is not a tmpfs, so CRIU neither keeps its kernel-feature cache
# /run/criu.kdat nor would notice one left from before a reboot: write it
# once per boot from a private tmpfs on /run, tagged with the boot id. The
# check costs two shell builtins; the write (≈0.1 s) happens once per boot.
read -r boot </proc/sys/kernel/random/boot_id
tag=
[ -r /run/criu.kdat.boot ] && read -r tag </run/criu.kdat.boot
if [ "$tag" != "$boot" ]; then
  rm -f /run/criu.kdat
  if t=$(mktemp -d /tmp/ember-kdat.XXXXXX 2>/dev/null); then
    unshare -m sh -c 'mount --make-rprivate / && mount -t tmpfs ember-kdat /run &&
      "$1/usr/lib64/ld-linux-x86-64.so.2" --library-path "$1/usr/lib/x86_64-linux-gnu" \
        "$1/usr/sbin/criu" check >/dev/null 2>&1; cp /run/criu.kdat "$2/"' \
      kdat "$R" "$t" 2>/dev/null
    if [ -s "$t/criu.kdat" ] && cp "$t/criu.kdat" "/run/.criu.kdat.$$" 2>/dev/null; then
      mv -f "/run/.criu.kdat.$$" /run/criu.kdat
    fi
    rm -rf "$t"
  fi
  # Tagged even when the write failed (not root): tried once per boot.
  echo "$boot" >/run/criu.kdat.boot 2>/dev/null
fi
EOF
  fi
  cat <<'EOF'
exec "$R/usr/lib64/ld-linux-x86-64.so.2" --library-path "$R/usr/lib/x86_64-linux-gnu" "$R/usr/sbin/criu" "$@"
EOF
} >"$wrapper.tmp"
chmod 0755 "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"

# The first run writes CRIU's kernel-feature cache (see above).
"$wrapper" check >/dev/null 2>&1 || true
if [ ! -s /run/criu.kdat ]; then
  echo "install-criu.sh: no /run/criu.kdat: every CRIU start probes the kernel (~50 ms)" >&2
fi
probe "$wrapper"
