#!/usr/bin/env bash
# A real build, clean and then restored through `ember cache` as a second
# node would: `cargo build` of a small binary depending on regex, serde
# (derive) and serde_json, fetched from crates.io. Clean = empty CARGO_HOME
# and target/; restored = both deleted (a fresh node), then
# `ember dircache restore` of ~/.cargo/registry and target/ saved after the
# clean build, then the same `cargo build`. Reports both times and the
# ratio (the issue's target: >= 1.9x). Writes results/build.md and build.json.
# Measurements, not tests.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
EMBER=${EMBER:-$ROOT/target/release/ember}
OUT=${OUT:-$HERE/results}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-dircache-build.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "work dir kept: $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT
log() { echo "== $*" >&2; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

[ -x "$EMBER" ] || { echo "build first: cargo build --release -p ember" >&2; exit 1; }
mkdir -p "$W/proj/src"
cat >"$W/proj/Cargo.toml" <<'TOML'
[package]
name = "cb"
version = "0.1.0"
edition = "2021"

[dependencies]
regex = "1"
serde = { version = "1", features = ["derive"] }
serde_json = "1"
TOML
cat >"$W/proj/src/main.rs" <<'RS'
#[derive(serde::Serialize)]
struct Out { matched: bool }
fn main() {
    let r = regex::Regex::new("a+b").unwrap();
    println!("{}", serde_json::to_string(&Out { matched: r.is_match("aab") }).unwrap());
}
RS
export CARGO_HOME=$W/home
P=$(free_port)
"$EMBER" cache --listen 127.0.0.1:$P --dir "$W/cache" --max-bytes 10G --upstream http://127.0.0.1:9 \
  >"$W/cache.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.05; done
URL=http://127.0.0.1:$P
KEY="cargo-$(sha256sum "$W/proj/Cargo.toml" | cut -c1-16)"
dc() { "$EMBER" --root "$W/root" dircache "$@" --cache "$URL" --quiet; }

log "clean build (empty CARGO_HOME and target/, crates from crates.io)"
t=$(now); (cd "$W/proj" && cargo build -q); CLEAN=$(secs "$t" "$(now)")
OUT1=$("$W/proj/target/debug/cb")

log "save ~/.cargo/registry and target/"
t=$(now)
dc save "$CARGO_HOME/registry" --scope main --key "$KEY-registry" >&2
dc save "$W/proj/target" --scope main --key "$KEY-target" >&2
SAVE=$(secs "$t" "$(now)")

log "a fresh node: both deleted, restored, built again"
rm -rf "$CARGO_HOME/registry" "$W/proj/target"
t=$(now)
dc restore "$CARGO_HOME/registry" --scope feature --fallback-scope main --key "$KEY-registry" --fail-on-miss >&2
dc restore "$W/proj/target" --scope feature --fallback-scope main --key "$KEY-target" --fail-on-miss >&2
R=$(now); RESTORE=$(secs "$t" "$R")
(cd "$W/proj" && cargo build -q); BUILD=$(secs "$R" "$(now)")
OUT2=$("$W/proj/target/debug/cb")
[ "$OUT1" = "$OUT2" ] || { echo "outputs differ: $OUT1 vs $OUT2" >&2; exit 1; }
TOTAL=$(python3 -c "print(f'{$RESTORE+$BUILD:.2f}')")
RATIO=$(python3 -c "print(f'{$CLEAN/($RESTORE+$BUILD):.1f}')")
REG=$(du -sb "$CARGO_HOME/registry" | cut -f1); TGT=$(du -sb "$W/proj/target" | cut -f1)

mkdir -p "$OUT"
cat >"$OUT/build.json" <<JSON
{"clean_s": $CLEAN, "save_s": $SAVE, "restore_s": $RESTORE, "build_after_restore_s": $BUILD,
 "restored_total_s": $TOTAL, "ratio": $RATIO, "registry_bytes": $REG, "target_bytes": $TGT,
 "nproc": $(nproc), "load": "$(cut -d' ' -f1-3 /proc/loadavg)", "fs": "$(df --output=fstype "$W" | tail -1)",
 "date": "$(date -u +%FT%TZ)"}
JSON
cat >"$OUT/build.md" <<MD
| \`cargo build\` (regex, serde + derive, serde_json; debug) | time |
| --- | --- |
| clean (crates from crates.io, empty target/) | $CLEAN s |
| restored on a fresh node: \`ember dircache restore\` of registry ($((REG / 1000000)) MB) + target/ ($((TGT / 1000000)) MB) | $RESTORE s |
| then \`cargo build\` | $BUILD s |
| restored total | **$TOTAL s ($RATIO× faster)** |
MD
cat "$OUT/build.md"
