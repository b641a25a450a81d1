#!/usr/bin/env bash
# Node CPU per run of several `ember` binaries, alternated session by
# session (A B C A B C ...), each session one `bench/burst/run.sh` (SQLite,
# NO_BUILD) with $REPS bursts: prints one line per burst and the medians
# per binary. Measurements, not tests.
#   BINS="/path/old /path/new" SESSIONS=3 bench/burst/ab.sh
# Extra knobs (PIN, RUNS, SLOTS, REPS) pass through to run.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
read -r -a bins <<<"${BINS:?binaries to compare}"
SESSIONS=${SESSIONS:-3}
export REPS=${REPS:-3} BACKENDS=${BACKENDS:-sqlite} NO_BUILD=1
OUTS=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-ab.XXXXXX")
for i in $(seq "$SESSIONS"); do
  for v in "${!bins[@]}"; do
    if ! EMBER=${bins[$v]} OUT=$OUTS/$v-$i "$HERE/run.sh" >/dev/null 2>"$OUTS/$v-$i.log"; then
      echo "session $v-$i failed:" >&2; tail "$OUTS/$v-$i.log" >&2; continue
    fi
    jq -r --arg v "$v" --arg i "$i" '.backends[].runs[] | "\($v) \($i) node_cpu \(.node_cpu_ms_per_run*1000|floor/1000) control_cpu \(.control_cpu_ms_per_run*1000|floor/1000) runs/s \(.runs_per_s|floor) raw \(.raw_runs_per_s|floor)"' "$OUTS/$v-$i/latest.json"
  done
done | tee "$OUTS/lines"
python3 - "$OUTS/lines" "${bins[@]}" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for v, b in enumerate(sys.argv[2:]):
    r = [x for x in rows if x[0] == str(v)]
    if not r: continue
    f = lambda k: statistics.median(float(x[x.index(k) + 1]) for x in r)
    print(f"{b}: {len(r)} bursts, median node CPU {f('node_cpu'):.3f} ms/run, control {f('control_cpu'):.3f} ms/run, {f('runs/s'):.0f} runs/s, raw {f('raw'):.0f} runs/s")
PY
echo "results: $OUTS" >&2
