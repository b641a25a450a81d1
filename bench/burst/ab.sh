#!/usr/bin/env bash
# Node CPU per run of two `ember` binaries, alternated session by session
# (A B A B ...), each session one `bench/burst/run.sh` (SQLite, NO_BUILD)
# with $REPS bursts: prints one line per burst and the medians per binary.
# A=/path/to/old B=/path/to/new SESSIONS=4 bench/burst/ab.sh
# Measurements, not tests. Extra knobs (PIN, RUNS, SLOTS) pass through to run.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
A=${A:?old binary}; B=${B:?new binary}; SESSIONS=${SESSIONS:-4}
export REPS=${REPS:-2} BACKENDS=${BACKENDS:-sqlite} NO_BUILD=1
OUTS=$(mktemp -d /var/tmp/ember-ab.XXXXXX)
for i in $(seq "$SESSIONS"); do
  for v in A B; do
    bin=${!v}
    EMBER=$bin OUT=$OUTS/$v-$i "$HERE/run.sh" >/dev/null 2>"$OUTS/$v-$i.log" || { echo "session $v-$i failed:" >&2; tail "$OUTS/$v-$i.log" >&2; continue; }
    jq -r --arg v "$v" --arg i "$i" '.backends[].runs[] | "\($v) \($i) node_cpu \(.node_cpu_ms_per_run*1000|floor/1000) control_cpu \(.control_cpu_ms_per_run*1000|floor/1000) runs/s \(.runs_per_s|floor) raw \(.raw_runs_per_s|floor) load \(input_filename)"' "$OUTS/$v-$i/latest.json" | sed 's| load .*||'
  done
done | tee "$OUTS/lines"
python3 - "$OUTS/lines" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for v in "AB":
    r = [x for x in rows if x[0] == v]
    if not r: continue
    f = lambda k: statistics.median(float(x[x.index(k) + 1]) for x in r)
    print(f"{v}: {len(r)} bursts, median node CPU {f('node_cpu'):.3f} ms/run, control {f('control_cpu'):.3f} ms/run, {f('runs/s'):.0f} runs/s, raw {f('raw'):.0f} runs/s")
PY
echo "results: $OUTS" >&2
