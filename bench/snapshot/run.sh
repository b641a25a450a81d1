#!/usr/bin/env bash
# `ember run --snapshot` (restore of a CRIU checkpoint taken after a slow
# start-up) vs a cold `ember run` of the same start-up vs `podman run` of it,
# side by side in one run, on the busybox fixture from a local
# docker-registry. The start-up is a shell that sleeps WARMUP seconds
# (standing in for imports and cache warming), then, under the readiness
# protocol, signals ready and waits for its request; without it (cold runs,
# podman) it goes straight on. Every run prints one line and exits 0.
#
# Reports wall time per run (spawn to exit, as a caller sees it): median,
# min and max of RUNS runs each, and the ratios of the medians. Needs root,
# runc, CRIU (scripts/install-criu.sh), podman, docker-registry and the
# static agent. Measurements, not tests: nothing fails on a number.
# Writes bench/snapshot/results/latest.md.
set -euo pipefail

WARMUP=${WARMUP:-1}
RUNS=${RUNS:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
pick() { [ -x "$ROOT/target/release/$1" ] && echo "$ROOT/target/release/$1" || echo "$ROOT/target/debug/$1"; }
EMBER=${EMBER:-$(pick ember)}
FIXTURES=${EMBER_FIXTURES:-$(pick ember-fixtures)}
export EMBER_AGENT=${EMBER_AGENT:-$("$ROOT/crates/ember-agent/build-static.sh")}
OUT=${OUT:-$HERE/results}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-snapshot-bench.XXXXXX")
PIDS=()
# podman against a throwaway store, with the flags bench/run.sh uses (its
# default rlimits are refused here); runroot kept short (podman's limit).
PR=$(mktemp -d /tmp/pbs.XXXX)
PODMAN=(podman --root "$W/podman-store" --runroot "$PR/run" --tmpdir "$PR/tmp"
  --storage-driver overlay --runtime runc --cgroup-manager cgroupfs --events-backend file)

log() { echo "== $*" >&2; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "${PODMAN[@]}" rmi -af >/dev/null 2>&1 || true
  rm -rf "$PR"
  [ -n "${KEEP:-}" ] && echo "work dir kept: $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT

for t in "$EMBER" "$FIXTURES"; do
  [ -x "$t" ] || { echo "missing $t (cargo build -p ember -p ember-testkit)" >&2; exit 1; }
done
command -v podman >/dev/null || { echo "podman is missing" >&2; exit 1; }

PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$W/registry"
cat >"$W/registry/config.yml" <<CFG
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: "$W/registry"}}
http: {addr: "127.0.0.1:$PORT", secret: bench-not-a-secret}
CFG
docker-registry serve "$W/registry/config.yml" >"$W/registry.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do curl -fs -o /dev/null "http://127.0.0.1:$PORT/v2/" && break; sleep 0.05; done
"$FIXTURES" push --registry "127.0.0.1:$PORT" busybox >&2
IMAGE=127.0.0.1:$PORT/ember/busybox:latest
STORE=$W/store

STARTUP="sleep $WARMUP; if [ -n \"\${EMBER_READY_FD:-}\" ]; then echo ready >&3; read -r req <&3; else req=cold; fi; echo \"\$req\" | head -c 40; echo"

log "pulling into ember and podman"
"$EMBER" --root "$STORE" pull "$IMAGE" >&2
"${PODMAN[@]}" pull -q --tls-verify=false "$IMAGE" >/dev/null

log "capturing snapshot (warm-up ${WARMUP}s)"
t0=$(date +%s.%N)
"$EMBER" --root "$STORE" snapshot create bench "$IMAGE" -- /bin/sh -c "$STARTUP" 2>"$W/capture.log"
t1=$(date +%s.%N)
CAPTURE_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
SIZE=$("$EMBER" --root "$STORE" snapshot ls --json | python3 -c 'import json,sys;m=json.load(sys.stdin)[0];print(m["artifact_bytes"], m["unpacked_bytes"])')

measure() { # NAME CMD... : RUNS wall times in seconds into $W/NAME
  : >"$W/$1"
  local name=$1; shift
  for _ in $(seq "$RUNS"); do
    local a b
    a=$(date +%s.%N)
    "$@" >"$W/$name.out" 2>"$W/$name.err" || { echo "$name failed:" >&2; cat "$W/$name.err" >&2; exit 1; }
    b=$(date +%s.%N)
    awk -v a="$a" -v b="$b" 'BEGIN {printf "%.4f\n", b - a}' >>"$W/$name"
  done
}

log "restore: $RUNS runs"
measure restore "$EMBER" --root "$STORE" run --snapshot bench --no-fallback -- x
log "cold ember run: $RUNS runs"
measure cold "$EMBER" --root "$STORE" run "$IMAGE" /bin/sh -c "$STARTUP"
log "podman run: $RUNS runs"
measure podman "${PODMAN[@]}" run --rm --network none --ulimit nofile=1024:1024 \
  --ulimit nproc=1024:1024 "$IMAGE" /bin/sh -c "$STARTUP"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", a / b}'; }
stats() { sort -n "$W/$1" | awk '{a[NR]=$1} END {m = (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2; printf "%.3f %.3f %.3f\n", m, a[1], a[NR]}'; }
read -r R_MED R_MIN R_MAX < <(stats restore)
read -r C_MED C_MIN C_MAX < <(stats cold)
read -r P_MED P_MIN P_MAX < <(stats podman)
read -r A_BYTES U_BYTES <<<"$SIZE"

mkdir -p "$OUT"
{
  echo "# ember run --snapshot vs cold ember run vs podman run ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "busybox fixture, start-up: \`sleep $WARMUP\` then one line of output; $RUNS runs each,"
  echo "wall time from spawn to exit; $(nproc) CPUs, $(uname -r), CRIU $(criu --version | awk '/Version/ {print $2}'),"
  echo "podman $(podman --version | awk '{print $3}'); ember: $(basename "$(dirname "$EMBER")") build."
  echo "Capture took $CAPTURE_S s; artifact $A_BYTES bytes ($U_BYTES unpacked)."
  echo
  echo "| | median s | min s | max s | median vs restore |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  echo "| ember run --snapshot (restore) | $R_MED | $R_MIN | $R_MAX | 1.0× |"
  echo "| ember run (cold) | $C_MED | $C_MIN | $C_MAX | $(ratio "$C_MED" "$R_MED")× |"
  echo "| podman run --network none | $P_MED | $P_MIN | $P_MAX | $(ratio "$P_MED" "$R_MED")× |"
} | tee "$OUT/latest.md"
