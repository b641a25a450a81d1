#!/usr/bin/env bash
# Snapshot restore of an init-heavy Python start-up, side by side in one run
# with a fresh start and a warm runner (issue 12's benchmark). The image is
# the `debian-python` fixture (ember-fixtures: debootstrap bookworm with
# Debian's python3, numpy, yaml, requests, jinja2) pushed to a local
# docker-registry and pulled once; the start-up is bench/snapshot/app.py:
# ~60 stdlib modules + those libraries imported, then WARMUP seconds of
# warm-up, then (under the readiness protocol) `ready` and a wait for the
# run's line; every run prints one random 64-bit value.
#
# For each WARMUP (default "1 3"), through the CLI (`ember snapshot create`,
# `ember run --snapshot --no-fallback`, `ember run`), first-output latency
# (spawn of `ember` to its first line of stdout, bench/snapshot/firstout.py):
#   fresh    FRESH_RUNS cold `ember run` of the same command (image on the node)
#   restore  RESTORES restores in a row, then 8 at once
#   cache    RESTORES restores in a second store ("node") that never ran the
#            start-up: the image pulled, the checkpoint pushed to a real
#            `ember cache` by the first and pulled from it (`ember snapshot
#            push|pull`); its first restore unpacks and verifies the artifact
#   warm     `ember bench warm --n WARM_RUNS` of the same command in a recycled
#            warm runner (its p50/p99 are per action, spawn to exit: the
#            program prints only at its end, so that is first output + exit)
# plus the capture's time and the artifact's size, and at the first WARMUP
# that 100 restored runs printed 100 different values. Measurements, not
# tests: nothing fails on a number. Needs root, runc, CRIU
# (scripts/install-criu.sh), docker-registry, debootstrap (first time) and
# the static agent. Writes bench/snapshot/results/latest.md.
set -euo pipefail

WARMUPS=${WARMUPS:-1 3}
FRESH_RUNS=${FRESH_RUNS:-5}
RESTORES=${RESTORES:-20}
WARM_RUNS=${WARM_RUNS:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
pick() { [ -x "$ROOT/target/release/$1" ] && echo "$ROOT/target/release/$1" || echo "$ROOT/target/debug/$1"; }
EMBER=${EMBER:-$(pick ember)}
FIXTURES=${EMBER_FIXTURES:-$(pick ember-fixtures)}
export EMBER_AGENT=${EMBER_AGENT:-$("$ROOT/crates/ember-agent/build-static.sh")}
OUT=${OUT:-$HERE/results}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-snapshot-bench.XXXXXX")
PIDS=()
FIRSTOUT=$HERE/firstout.py
APP=$(cat "$HERE/app.py")

log() { echo "== $*" >&2; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "work dir kept: $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT

for t in "$EMBER" "$FIXTURES"; do
  [ -x "$t" ] || { echo "missing $t (cargo build -p ember -p ember-testkit)" >&2; exit 1; }
done

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
"$FIXTURES" push --registry "127.0.0.1:$PORT" debian-python >&2
IMAGE=127.0.0.1:$PORT/ember/debian-python:latest
E=("$EMBER" --root "$W/store")
E2=("$EMBER" --root "$W/store2")
log "pulling $IMAGE"
"${E[@]}" pull "$IMAGE" >&2
"${E2[@]}" pull "$IMAGE" >&2
CPORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
export EMBER_SNAPSHOT_TOKEN=bench-snapshot-token
EMBER_SNAPSHOT_WRITE_TOKEN=$EMBER_SNAPSHOT_TOKEN "$EMBER" cache --listen "127.0.0.1:$CPORT" --dir "$W/cache" \
  --max-bytes 4G --upstream "http://127.0.0.1:$PORT" >"$W/cache.log" 2>&1 &
PIDS+=($!)
CACHE=http://127.0.0.1:$CPORT
for _ in $(seq 200); do curl -s -o /dev/null "$CACHE/" && break; sleep 0.05; done

# p50 p99 max of a firstout.py JSON file's first_s (nearest rank).
stats() { python3 - "$@" <<'PY'
import json, math, sys
xs = sorted(r["first_s"] for f in sys.argv[1:] for r in json.load(open(f)))
rank = lambda q: xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]
print("%.3f %.3f %.3f %d" % (rank(0.5), rank(0.99), xs[-1], len(xs)))
PY
}
distinct() { python3 - "$@" <<'PY'
import json, sys
lines = [r["line"] for f in sys.argv[1:] for r in json.load(open(f))]
print(len(lines), len(set(lines)))
PY
}

ROWS=()
for WU in $WARMUPS; do
  log "warm-up ${WU}s: capture"
  t0=$(date +%s.%N)
  "${E[@]}" snapshot create "py$WU" "$IMAGE" -- python3 -c "$APP" "$WU" 2>"$W/capture$WU.log"
  t1=$(date +%s.%N)
  CAP=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
  read -r ABYTES UBYTES < <("${E[@]}" snapshot ls --json | python3 -c "
import json,sys
m=[s for s in json.load(sys.stdin) if s['name']=='py$WU'][0]
print(m['artifact_bytes'], m['unpacked_bytes'])")
  log "warm-up ${WU}s: $FRESH_RUNS fresh starts"
  python3 "$FIRSTOUT" "$FRESH_RUNS" 1 -- "${E[@]}" run "$IMAGE" python3 -c "$APP" "$WU" >"$W/fresh$WU.json"
  log "warm-up ${WU}s: $RESTORES restores in a row, then 8 at once"
  RESTORE=("${E[@]}" run --snapshot "py$WU" --no-fallback -- x)
  python3 "$FIRSTOUT" "$RESTORES" 1 -- "${RESTORE[@]}" >"$W/seq$WU.json"
  python3 "$FIRSTOUT" 8 8 -- "${RESTORE[@]}" >"$W/conc$WU.json"
  log "warm-up ${WU}s: through the cache into a second store, $RESTORES restores there"
  "${E[@]}" snapshot push "py$WU" --cache "$CACHE" >&2
  t0=$(date +%s.%N)
  "${E2[@]}" snapshot pull "py$WU" --cache "$CACHE" >&2
  t1=$(date +%s.%N)
  FETCH=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
  python3 "$FIRSTOUT" "$RESTORES" 1 -- "${E2[@]}" run --snapshot "py$WU" --no-fallback -- x >"$W/cache$WU.json"
  log "warm-up ${WU}s: warm runner, $WARM_RUNS actions"
  "${E[@]}" bench warm --image "$IMAGE" --n "$WARM_RUNS" --runc-n 0 --podman-n 0 --json \
    -- python3 -c "$APP" "$WU" >"$W/warm$WU.json" 2>"$W/warm$WU.err"
  read -r WP50 WP99 < <(python3 -c "
import json,sys; j=json.load(open('$W/warm$WU.json')); print('%.3f %.3f' % (j['p50_ms']/1e3, j['p99_ms']/1e3))")
  read -r F50 F99 FMAX FN < <(stats "$W/fresh$WU.json")
  read -r S50 S99 SMAX SN < <(stats "$W/seq$WU.json")
  read -r C50 C99 CMAX CN < <(stats "$W/conc$WU.json")
  read -r K50 K99 KMAX KN < <(stats "$W/cache$WU.json")
  ROWS+=("| ${WU} s | $F50 / $F99 | $S50 / $S99 | $C50 / $CMAX | $K50 / $K99 (pull $FETCH s) | $WP50 / $WP99 | $(awk -v a="$F50" -v b="$S50" 'BEGIN {printf "%.1f", a / b}')× | $(awk -v a="$CMAX" -v b="$S50" 'BEGIN {printf "%.1f", a / b}')× | $CAP s | $((ABYTES / 1024)) KiB ($((UBYTES / 1048576)) MiB unpacked) |")
  if [ -z "${DISTINCT:-}" ]; then
    log "warm-up ${WU}s: restores up to 100 in all (4 at once) for distinct values"
    left=$((100 - RESTORES - 8))
    if [ "$left" -gt 0 ]; then python3 "$FIRSTOUT" "$left" 4 -- "${RESTORE[@]}" >"$W/more$WU.json"; else echo '[]' >"$W/more$WU.json"; fi
    read -r DN DU < <(distinct "$W/seq$WU.json" "$W/conc$WU.json" "$W/more$WU.json")
    DISTINCT="$DN restored runs (warm-up ${WU} s) printed $DU different values"
  fi
done

# Through `ember control` + `ember node` (a snapshot deployment of the same
# app, first-output latency of `ember submit --wait`), at NODE_WARMUP: the
# node's on-demand restore (--snapshot-spares 0) and prepared copies
# (--snapshot-spares NODE_SPARES), lone runs and 8 at once, and a fresh
# start through the node (a plain deployment of the same command) in the
# same run for the ratio.
NODE_WARMUP=${NODE_WARMUP:-1}
NODE_SPARES=${NODE_SPARES:-8}
NODE_RUNS=${NODE_RUNS:-10}
NODE_ROWS=()
spares_metric() { curl -fs "http://$1/metrics" | awk '/^ember_node_snapshot_spares/ {print int($2)}'; }
for SP in 0 "$NODE_SPARES"; do
  log "node, --snapshot-spares $SP: control plane + node"
  NW=$W/node$SP
  mkdir -p "$NW"
  "$EMBER" --root "$NW/control" control --listen 127.0.0.1:0 --db "$NW/control.db" \
    --client-token bench-client --node-token bench-node >"$NW/control.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 200); do grep -qo 'http://[0-9.:]*' "$NW/control.log" && break; sleep 0.05; done
  export EMBER_CONTROL=$(grep -o 'http://[0-9.:]*' "$NW/control.log" | head -1)
  export EMBER_TOKEN=bench-client
  MPORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  "$EMBER" --root "$NW/node" node --control "$EMBER_CONTROL" --token bench-node --id n1 --slots 8 \
    --agent "$EMBER_AGENT" --snapshot-spares "$SP" --metrics-listen "127.0.0.1:$MPORT" >"$NW/node.log" 2>&1 &
  NPID=$!
  PIDS+=($NPID)
  for _ in $(seq 300); do "$EMBER" nodes --json 2>/dev/null | grep -q '"n1"' && break; sleep 0.1; done
  "$EMBER" deploy --snapshot snap "$IMAGE" -- python3 -c "$APP" "$NODE_WARMUP" >&2
  "$EMBER" deploy fresh "$IMAGE" -- python3 -c "$APP" "$NODE_WARMUP" >&2
  "$EMBER" submit --wait --deployment snap -- x >/dev/null
  for _ in $(seq 600); do "$EMBER" nodes --json | grep -q '"d.snap.' && break; sleep 0.1; done
  python3 "$FIRSTOUT" 3 1 -- "$EMBER" submit --wait --deployment fresh >"$NW/fresh.json"
  want=$((SP < 8 ? SP : 8))
  waitspares() { for _ in $(seq 600); do [ "$(spares_metric "127.0.0.1:$MPORT")" -ge "$1" ] && break; sleep 0.1; done; }
  lone=()
  for i in $(seq "$NODE_RUNS"); do
    if [ "$SP" -gt 0 ]; then waitspares "$want"; fi
    python3 "$FIRSTOUT" 1 1 -- "$EMBER" submit --wait --deployment snap -- x >"$NW/lone$i.json"
    lone+=("$NW/lone$i.json")
  done
  if [ "$SP" -gt 0 ]; then waitspares "$want"; fi
  python3 "$FIRSTOUT" 8 8 -- "$EMBER" submit --wait --deployment snap -- x >"$NW/conc.json"
  SERVED=$(curl -fs "http://127.0.0.1:$MPORT/metrics" | awk '/^ember_node_snapshot_runs_total/ {printf "%s ", $0}')
  read -r F50 F99 FMAX FN < <(stats "$NW/fresh.json")
  read -r L50 L99 LMAX LN < <(stats "${lone[@]}")
  read -r C50 C99 CMAX CN < <(stats "$NW/conc.json")
  NODE_ROWS+=("| $SP | $F50 | $L50 / $L99 | $C50 / $CMAX | $(awk -v a="$F50" -v b="$L50" 'BEGIN {printf "%.1f", a / b}')× | $(awk -v a="$CMAX" -v b="$L50" 'BEGIN {printf "%.1f", a / b}')× | $SERVED |")
  kill "$NPID" 2>/dev/null || true
  wait "$NPID" 2>/dev/null || true
done

mkdir -p "$OUT"
{
  echo "# Snapshot restore vs fresh start vs warm runner, Python start-up ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "debian-python fixture, bench/snapshot/app.py; first-output latency in seconds (p50 / p99);"
  echo "$FRESH_RUNS fresh, $RESTORES restores in a row, 8 at once (p50 / max), $WARM_RUNS warm actions (spawn to exit);"
  echo "$(nproc) CPUs (load average $(cut -d' ' -f1 /proc/loadavg) at the end), $(uname -r), CRIU $(criu --version | awk '/Version/ {print $2}'), ember $(basename "$(dirname "$EMBER")") build."
  echo
  echo "| warm-up | fresh | restore | 8 at once | 2nd store via cache | warm runner | fresh / restore | slowest of 8 / lone p50 | capture | artifact |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for r in "${ROWS[@]}"; do echo "$r"; done
  echo
  echo "$DISTINCT."
  echo
  echo "Through \`ember control\` + \`ember node\` (\`ember submit --wait\`, warm-up $NODE_WARMUP s, $NODE_RUNS lone runs, 8 at once; fresh: 3 runs of a plain deployment of the same command):"
  echo
  echo "| --snapshot-spares | fresh p50 | lone p50 / p99 | 8 at once p50 / max | fresh / lone | slowest of 8 / lone p50 | runs by restore |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  for r in "${NODE_ROWS[@]}"; do echo "$r"; done
} | tee "$OUT/latest.md"
