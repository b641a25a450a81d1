#!/usr/bin/env bash
# A run's pull of an image alone vs the same pull while the node's pre-pulls
# of other images are in flight (`ember bench prepull`): same registry, same
# run, several repetitions with the arms in rotating order, medians and their
# ratio. The target: pre-pulls never delay a run's pull by more than 10 %.
#
#   bench/prepull/run.sh [--reps N] [--image big] [--prepull "multi devices"]
#                        [--bandwidth 0|SIZE] [--no-build]
#
# A docker-registry on loopback serves the fixtures. The pre-pulls are the
# node's own code (ember_node::Prepuller) at --bandwidth (default 0: uncapped,
# the hardest case for the yield); the third arm pulls the same images with no
# gate, to show what the yield saves. No root needed. Measurements, not tests.
# Writes bench/prepull/results/latest.json and latest.md.
set -euo pipefail

REPS=5
IMAGE=big
PREPULL="multi"
BANDWIDTH=0
BUILD=1
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=$HERE/results
while (($#)); do
  case $1 in
    --reps) REPS=$2; shift ;;
    --image) IMAGE=$2; shift ;;
    --prepull) PREPULL=$2; shift ;;
    --bandwidth) BANDWIDTH=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "== $*" >&2; }
if ((BUILD)); then
  log "building (cargo build --release -p ember -p ember-testkit)"
  (cd "$REPO" && cargo build --release -q -p ember -p ember-testkit)
fi
EMBER=${EMBER:-$REPO/target/release/ember}
FIXTURES=${EMBER_FIXTURES:-$REPO/target/release/ember-fixtures}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-prepull-bench.XXXXXX")
REGISTRY_PID=
cleanup() {
  [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$W/storage"
cat >"$W/config.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/storage
http:
  addr: 127.0.0.1:$port
  secret: ember-bench-not-a-secret
YAML
docker-registry serve "$W/config.yml" >"$W/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
R=127.0.0.1:$port
# shellcheck disable=SC2086
"$FIXTURES" push --registry "$R" $IMAGE $PREPULL >"$W/push.log" 2>&1 \
  || { cat "$W/push.log" >&2; exit 1; }

args=(--image "$R/ember/$IMAGE:latest" --reps "$REPS" --bandwidth "$BANDWIDTH" --unyielding --json)
for p in $PREPULL; do args+=(--prepull "$R/ember/$p:latest"); done
log "ember bench prepull ${args[*]}"
mkdir -p "$OUT"
"$EMBER" --root "$W/root" bench prepull "${args[@]}" >"$W/out.json"

python3 - "$W/out.json" "$OUT" "$IMAGE" "$PREPULL" "$BANDWIDTH" "$REPS" <<'PY'
import json, os, platform, subprocess, sys, datetime
src, out, image, prepull, bw, reps = sys.argv[1:]
r = json.load(open(src))
cond = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "cpus": os.cpu_count(),
    "load_1m": os.getloadavg()[0],
    "kernel": platform.release(),
    "registry": "docker-registry on loopback",
}
r["conditions"] = cond
json.dump(r, open(os.path.join(out, "latest.json"), "w"), indent=2)
cap = "uncapped" if bw in ("0", "") else bw + "/s"
f = lambda v: " ".join(f"{x:.0f}" for x in v)
md = f"""# Pre-pull yield: a run's pull alone vs with pre-pulls in flight

{cond['date']}, git {cond['git']}, {cond['cpus']} CPUs (load {cond['load_1m']:.1f} at the end), kernel {cond['kernel']}, {cond['registry']}.
Run's image: `{image}` ({r['image_bytes']} compressed bytes); pre-pulled meanwhile: `{prepull}` ({cap}); {reps} repetitions, arms in rotating order.

| arm | median ms | ratio to alone | every repetition (ms) |
|---|---:|---:|---|
| alone | {r['median_alone_ms']:.0f} | 1.000 | {f(r['alone_ms'])} |
| with the node's pre-pulls (yielding) | {r['median_with_prepull_ms']:.0f} | {r['ratio']:.3f} | {f(r['with_prepull_ms'])} |
| with ungated pulls of the same images | {r['median_unyielding_ms']:.0f} | {r['unyielding_ratio']:.3f} | {f(r['unyielding_ms'])} |

Bytes the pre-pulls received while the run's image was pulling: {r['prepull_bytes_during']}.
Target: ratio ≤ 1.10.
"""
open(os.path.join(out, "latest.md"), "w").write(md)
print(md)
PY
