#!/usr/bin/env bash
# `ember bench burst` against a real cluster on this machine: `ember control`
# and one `ember node --slots $SLOTS`, $RUNS no-op runs (`true` in the busybox
# fixture) submitted at once, $REPS times; medians reported. Each burst is
# followed, in the same `ember bench burst` invocation, by the same action
# through a local warm pool with $SLOTS threads (the node's raw throughput),
# so the control plane's overhead is 1 - burst runs/s / raw runs/s.
#
# First with the SQLite store (`ember control --db FILE`), then with
# PostgreSQL (`--db postgres://...`, a private server started here from
# Debian's package binaries) when `ember control --help` says it takes one.
# Needs root (runc; postgres runs as the `postgres` user via runuser).
# Measurements, not tests: nothing fails on a number.
# Writes bench/burst/results/latest.md and latest.json.
set -euo pipefail

RUNS=${RUNS:-1000}
REPS=${REPS:-3}
SLOTS=${SLOTS:-8}
SUBMITTERS=${SUBMITTERS:-64}
BACKENDS=${BACKENDS:-sqlite postgres}
# PostgreSQL settings beyond the defaults (which fsync every commit, like
# the SQLite store's synchronous=FULL).
PG_OPTS=${PG_OPTS:-}
# PIN=NODE_CPUS/CONTROL_CPUS (e.g. 0/1): the node, its containers and the
# raw pool measurement on NODE_CPUS; the control plane, PostgreSQL and the
# bench client on CONTROL_CPUS. Stands in for a control plane on its own
# machine, so the overhead is what the control plane costs the node and
# not the CPU it takes from the containers. Empty: no pinning.
PIN=${PIN:-}
# CMD="sh -c true": the command every run and raw action runs (`-- CMD`),
# for an image whose Entrypoint cannot run `true`. Empty: `true`.
CMD=${CMD:-}
CMD_ARGS=()
if [ -n "$CMD" ]; then
  read -r -a words <<<"$CMD"
  CMD_ARGS=(-- "${words[@]}")
fi
NODE_RUN=() CONTROL_RUN=() RAW_CPUS=()
if [ -n "$PIN" ]; then
  NODE_RUN=(taskset -c "${PIN%/*}")
  CONTROL_RUN=(taskset -c "${PIN#*/}")
  RAW_CPUS=(--raw-cpus "${PIN%/*}")
fi
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
EMBER=${EMBER:-$ROOT/target/release/ember}
FIXTURES=${EMBER_FIXTURES:-$ROOT/target/release/ember-fixtures}
OUT=${OUT:-$HERE/results}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-burst-bench.XXXXXX")
PIDS=()      # registry
RUNNING=()   # the current backend's control plane and node
PG_DIR=
PG_BIN=

# shellcheck source=../../scripts/lib.sh
source "$ROOT/scripts/lib.sh"

log() { echo "== $*" >&2; }

# cpu_ms PID: CPU time (user + system) the process has used, in ms.
cpu_ms() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print int(($12 + $13) * 1000 / hz) }' "/proc/$1/stat"
}

# stop PID...: SIGTERM, then wait (the node destroys its runners on the way out).
stop() {
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

cleanup() {
  stop "${RUNNING[@]}" "${PIDS[@]}"
  if [ -n "$PG_DIR" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
  fi
  if [ -n "${KEEP:-}" ]; then echo "work dir kept: $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- build
if [ -z "${NO_BUILD:-}" ]; then
  log "building release binaries and the static agent"
  (cd "$ROOT" && cargo build --release -p ember -p ember-testkit --bin ember --bin ember-fixtures >&2)
fi
AGENT=${EMBER_AGENT:-$("$ROOT/crates/ember-agent/build-static.sh")}
export EMBER_AGENT=$AGENT

# ---------------------------------------------------------------- registry with the demo image
start_registry "$W/registry"
PIDS+=("$REGISTRY_PID")
"$FIXTURES" push --registry "$REGISTRY_ADDR" busybox >/dev/null
IMAGE=$REGISTRY_ADDR/ember/busybox:latest
log "registry $REGISTRY_ADDR with $IMAGE"

# ---------------------------------------------------------------- one backend
# run_backend NAME DB: control plane on DB + one node, $REPS bursts into
# $W/NAME/run-<i>.json.
run_backend() {
  local name=$1 db=$2 port url i
  local d=$W/$name
  mkdir -p "$d"
  port=$(free_port)
  url=http://127.0.0.1:$port
  "${CONTROL_RUN[@]}" "$EMBER" --log warn control --listen "127.0.0.1:$port" --db "$db" \
    --client-token bench-client --node-token bench-node 2>"$d/control.log" &
  RUNNING=("$!")
  export EMBER_CONTROL=$url EMBER_TOKEN=bench-client
  for _ in $(seq 100); do "$EMBER" nodes >/dev/null 2>&1 && break; sleep 0.1; done
  "${NODE_RUN[@]}" "$EMBER" --log warn --root "$d/node" node --control "$url" --token bench-node --id node-1 \
    --slots "$SLOTS" --agent "$AGENT" 2>"$d/node.log" &
  RUNNING+=("$!")
  local nodes=
  for _ in $(seq 100); do
    nodes=$("$EMBER" nodes --json 2>/dev/null || true)
    case $nodes in *'"node-1"'*) break ;; esac
    sleep 0.1
  done
  case $nodes in *'"node-1"'*) ;; *) echo "the node did not register:" >&2; cat "$d/node.log" >&2; return 1 ;; esac
  for i in $(seq "$REPS"); do
    log "$name: burst $i/$REPS ($RUNS runs, $SLOTS slots)"
    local c0 n0 c1 n1
    c0=$(cpu_ms "${RUNNING[0]}") n0=$(cpu_ms "${RUNNING[1]}")
    # The bench's store and raw pool live apart from the node's.
    if ! "${CONTROL_RUN[@]}" "$EMBER" --log warn --root "$W/bench-root" bench burst --image "$IMAGE" --runs "$RUNS" \
      --submitters "$SUBMITTERS" "${RAW_CPUS[@]}" --json "${CMD_ARGS[@]}" >"$d/run-$i.json" 2>"$d/run-$i.err"; then
      echo "ember bench burst exited non-zero; its stderr:" >&2
      tail -n 20 "$d/run-$i.err" >&2
    fi
    # CPU the control plane and the node used per run of the burst (the
    # node's figure leaves out the containers; the control plane's leaves
    # out PostgreSQL's own processes). Read after the raw measurement, when
    # both are idle again, so it is the burst's and the warm-up's.
    c1=$(cpu_ms "${RUNNING[0]}") n1=$(cpu_ms "${RUNNING[1]}")
    if [ -s "$d/run-$i.json" ]; then
      jq -c --argjson c $((c1 - c0)) --argjson n $((n1 - n0)) \
        '. + {control_cpu_ms_per_run: ($c / (.runs + .warmup)), node_cpu_ms_per_run: ($n / (.runs + .warmup))}' \
        "$d/run-$i.json" >"$d/run-$i.json.tmp" && mv "$d/run-$i.json.tmp" "$d/run-$i.json"
    fi
    jq -r '"   \(.runs_per_s|floor) runs/s, first start \(.first_start_ms) ms, p50 \(.p50_ms) ms, p99 \(.p99_ms) ms, failed \(.failed); raw \(.raw_runs_per_s // 0|floor) runs/s, overhead \((.overhead // 0) * 100 | floor) %; CPU per run: control \(.control_cpu_ms_per_run // 0 | . * 100 | floor / 100) ms, node \(.node_cpu_ms_per_run // 0 | . * 100 | floor / 100) ms"' \
      "$d/run-$i.json" >&2 || true
  done
  # The node first, so it reports and destroys its runners while the
  # control plane still answers.
  stop "${RUNNING[1]}"
  stop "${RUNNING[0]}"
  RUNNING=()
  unset EMBER_CONTROL EMBER_TOKEN
}

# ---------------------------------------------------------------- a private PostgreSQL
# start_postgres: initdb + postgres as the postgres user on a free port;
# sets PG_URL.
start_postgres() {
  local bin port
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  PG_BIN=$bin
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "no PostgreSQL binaries under /usr/lib/postgresql (apt-get install postgresql)" >&2
    return 1
  fi
  PG_DIR=$(mktemp -d /tmp/ember-burst-pg.XXXXXX)
  chown postgres:postgres "$PG_DIR"
  runuser -u postgres -- "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust \
    -E UTF8 --locale=C >"$W/initdb.log" 2>&1
  port=$(free_port)
  # shellcheck disable=SC2086 # PG_OPTS is a list of -c options
  "${CONTROL_RUN[@]}" runuser -u postgres -- "$bin/postgres" -D "$PG_DIR/data" -p "$port" -k "$PG_DIR" \
    -c listen_addresses=127.0.0.1 -c max_connections=200 $PG_OPTS >"$W/postgres.log" 2>&1 &
  for _ in $(seq 100); do
    runuser -u postgres -- "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 0.1
  done
  runuser -u postgres -- "$bin/createdb" -h 127.0.0.1 -p "$port" ember
  PG_URL=postgres://postgres@127.0.0.1:$port/ember
  PG_VERSION=$("$bin/postgres" --version)
}

DONE=()
for backend in $BACKENDS; do
  case $backend in
    sqlite)
      run_backend sqlite "$W/sqlite/control.db"
      DONE+=(sqlite)
      ;;
    postgres)
      help=$("$EMBER" control --help)
      case ${help,,} in *postgres*) ;; *) help= ;; esac
      if [ -z "$help" ]; then
        log "postgres: skipped: this ember control has no PostgreSQL store yet (--db takes a SQLite file only)"
        continue
      fi
      if ! start_postgres; then
        log "postgres: skipped: no private PostgreSQL could be started"
        continue
      fi
      log "postgres: $PG_VERSION at $PG_URL"
      run_backend postgres "$PG_URL"
      DONE+=(postgres)
      ;;
    *) echo "unknown backend $backend" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- report
mkdir -p "$OUT"
cpu=$(lscpu | awk -F: '/Model name/ {gsub(/^ +/,"",$2); print $2; exit}')
conditions="$(date -u +%Y-%m-%dT%H:%MZ), Linux $(uname -r), $(nproc) CPUs ($cpu), $(free -g | awk '/Mem/ {print $2}') GiB; \
load average $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end; $(df --output=fstype "$W" | tail -n 1) work dir; \
ember $("$EMBER" --version | awk '{print $2}') (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)); \
one node with $SLOTS slots and the control plane on loopback${PIN:+, pinned: node, containers and raw pool on CPU ${PIN%/*}, control plane, client and PostgreSQL on CPU ${PIN#*/}}; $RUNS runs of \`${CMD:-true}\` in the busybox fixture per burst, \
$SUBMITTERS submits in flight, $REPS bursts per store${PG_VERSION:+; $PG_VERSION}"
python3 - "$W" "$OUT" "$conditions" "${DONE[@]}" <<'PY'
import json, statistics, sys
w, out, conditions, backends = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
fields = ["runs_per_s", "first_start_ms", "p50_ms", "p99_ms", "failed",
          "raw_runs_per_s", "overhead", "submit_ms", "queue_p50_ms", "placement_p50_ms", "node_p50_ms",
          "control_cpu_ms_per_run", "node_cpu_ms_per_run"]
result = {"conditions": conditions, "backends": {}}
for b in backends:
    runs = []
    i = 1
    while True:
        try:
            with open(f"{w}/{b}/run-{i}.json") as f:
                text = f.read().strip()
        except FileNotFoundError:
            break
        if text:
            runs.append(json.loads(text))
        i += 1
    med = {}
    for k in fields:
        vals = [r[k] for r in runs if r.get(k) is not None]
        med[k] = statistics.median(vals) if vals else None
        med[k + "_all"] = vals
    result["backends"][b] = {"median": med, "runs": runs}
with open(f"{out}/latest.json", "w") as f:
    json.dump(result, f, indent=1)

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

lines = [f"# ember bench burst ({conditions.split(',')[0]})", "",
         "| store | runs/s | first start | p50 / p99 submit → started | failed | raw pool runs/s | overhead | CPU per run: control / node |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for b, r in result["backends"].items():
    m = r["median"]
    lines.append(
        f"| {b} | {fmt(m['runs_per_s'], ',.0f')} ({', '.join(format(v, ',.0f') for v in m['runs_per_s_all'])}) "
        f"| {fmt(m['first_start_ms'], '.0f')} ms | {fmt(m['p50_ms'], '.0f')} / {fmt(m['p99_ms'], '.0f')} ms "
        f"| {fmt(m['failed'], '.0f')} | {fmt(m['raw_runs_per_s'], ',.0f')} "
        f"| {fmt(None if m['overhead'] is None else m['overhead'] * 100, '.0f')} % "
        f"({', '.join(format(v * 100, '.0f') for v in m['overhead_all'])}) "
        f"| {fmt(m['control_cpu_ms_per_run'], '.2f')} / {fmt(m['node_cpu_ms_per_run'], '.2f')} ms |")
lines += ["", "Medians of the bursts (each value in parentheses); overhead = 1 - burst runs/s / raw runs/s, "
          "per burst, the raw pool measured right after it in the same invocation (target ≤ 20 %). "
          "CPU per run: user + system time of the `ember control` and `ember node` processes over the burst "
          "and its warm-up (PostgreSQL's processes and the containers not included).",
          "", "Conditions: " + conditions + "."]
with open(f"{out}/latest.md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
