#!/usr/bin/env bash
# Installs what is missing, builds Ember, and shows it end to end: a local
# registry with the demo image, a cold pull, a cold run and a hot run, with
# their start-time breakdowns side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

scripts/install-deps.sh
echo "== building Ember (release)"
cargo build --release -q -p ember -p ember-testkit
AGENT=$(crates/ember-agent/build-static.sh)
EMBER=$PWD/target/release/ember
FIXTURES=$PWD/target/release/ember-fixtures

WORK=$(mktemp -d /tmp/ember-demo.XXXXXX)
cleanup() {
  if [ -n "${UP_PID:-}" ]; then kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; fi
  [ -n "${CACHE_PID:-}" ] && kill "$CACHE_PID" 2>/dev/null || true
  [ -n "${REGISTRY_PID:-}" ] && kill "$REGISTRY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_registry "$WORK/registry"
echo "== registry (docker-registry) at $REGISTRY_ADDR"
"$FIXTURES" push --registry "$REGISTRY_ADDR" busybox multi >/dev/null
IMAGE=$REGISTRY_ADDR/ember/busybox:latest
BIG=$REGISTRY_ADDR/ember/multi:latest
ROOT=$WORK/store

echo
echo "== cold run: ember run --rm $IMAGE (not in the store yet)"
"$EMBER" --root "$ROOT" run --rm --timings=json "$IMAGE" 2>"$WORK/cold.json"
echo "== hot run: ember run --rm $IMAGE (already in the store)"
"$EMBER" --root "$ROOT" run --rm --timings=json "$IMAGE" 2>"$WORK/hot.json"
echo "== hot run with a command, a user and limits"
"$EMBER" --root "$ROOT" run --rm --user app --memory 64M --cpus 0.5 "$IMAGE" -- sh -c 'echo "I am $(id -un), in $(pwd)"'

echo
echo "== ember pull $BIG (cold: 7 layers, 110 MB compressed)"
"$EMBER" --root "$ROOT" pull "$BIG" >/dev/null
echo "(the busybox base layer was already in the store, so it was not fetched again)"
echo
echo "== ember images"
"$EMBER" --root "$ROOT" images

echo
echo "== start-time breakdown (ms)"
printf '%-16s %10s %10s\n' phase cold hot
for k in resolve_ms pull_ms unpack_ms mount_ms create_ms start_ms first_output_ms exit_ms cleanup_ms total_ms; do
  printf '%-16s %10s %10s\n' "${k%_ms}" "$(jq -r ".$k // \"-\"" "$WORK/cold.json")" "$(jq -r ".$k // \"-\"" "$WORK/hot.json")"
done
echo
echo "start = runc spawned → first output; first_output and exit are measured from ember's start."

echo
echo "== warm runners: 1000 no-op actions through one recycled runner (vs a runc exec loop)"
"$EMBER" --root "$ROOT" bench warm --image "$IMAGE" --n 1000 --runc-n 20 --podman-n 0 --agent "$AGENT"

echo
echo "== cluster cache: ember cache in front of the registry, two nodes pull through it"
CACHE_PORT=$(free_port)
"$EMBER" cache --listen "127.0.0.1:$CACHE_PORT" --dir "$WORK/cache" --max-bytes 2G \
  --upstream "http://$REGISTRY_ADDR" >"$WORK/cache.log" 2>&1 &
CACHE_PID=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$CACHE_PORT/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
for node in node-a node-b; do
  TIMEFORMAT="$node: pulled $BIG through the cache in %Rs"
  time "$EMBER" --root "$WORK/$node" pull -q --mirror "http://127.0.0.1:$CACHE_PORT" "$BIG" >/dev/null
done
curl -fsS "http://127.0.0.1:$CACHE_PORT/metrics" | grep -E '^ember_cache_(hits|misses|upstream_bytes)' || true

echo
echo "== the cluster on one machine: ember up (control plane + cache + 1 node), runs cold, hot and warm"
CONTROL_PORT=$(free_port)
"$EMBER" up --nodes 1 --data "$WORK/up" --listen "127.0.0.1:$CONTROL_PORT" \
  --upstream "http://$REGISTRY_ADDR" --agent "$AGENT" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 200); do [ -s "$WORK/up/env" ] && break; sleep 0.1; done
cat "$WORK/up/env"
# shellcheck disable=SC1091
source "$WORK/up/env"
"$EMBER" nodes
# Runners are shared only by runs that ask (a deployment or a recycling
# key); a plain submit would get a fresh runner of its own.
echo "-- first run: the node pulls $IMAGE through the cache and makes a runner"
"$EMBER" submit --wait --recycle-key demo "$IMAGE" -- sh -c 'echo "hello from a cluster run"'
echo "-- second run, same recycling key: the runner that just finished takes it"
"$EMBER" submit --wait --recycle-key demo "$IMAGE" -- sh -c 'echo "hello again, same runner"'
echo "-- 20 more warm runs"
for _ in $(seq 20); do "$EMBER" submit --wait --recycle-key demo "$IMAGE" -- true; done
"$EMBER" runs --stats
