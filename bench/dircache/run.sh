#!/usr/bin/env bash
# ember dircache vs `tar | zstd` over HTTP, side by side in one run, on a real
# tool cache: cargo's registry sources (~/.cargo/registry/src, ~280 MB, ~40k
# files here).
#
#   v1 = the registry without one crate, v2 = v1 plus that crate (a dependency
#   added). For each: ember dircache save/restore against `ember cache`, and
#   `tar -c | zstd -3 | curl -T` / `curl | zstd -d | tar -x` against nginx
#   (WebDAV PUT), plus `tar -x` of the uncompressed tar from local disk as the
#   floor for restoring. Reports times, bytes sent, the share of v2 a second
#   save uploads, and the dedup ratio across the two versions.
#
# Page cache warm (the trees were just copied), loopback network, both tools
# single-stream compression at zstd level 3; every timed restore ends with a
# `sync`, so each pays for its own writeback. CPU (user + system) of the ember
# restore and of `tar -x` is recorded too: on a shared machine it is steadier
# than wall time. BENCH_TMPDIR=/dev/shm takes the
# disk out (the numbers in the README). Measurements, not tests.
# Writes bench/dircache/results/latest.md and latest.json.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
EMBER=${EMBER:-$ROOT/target/release/ember}
SRC=${SRC:-$(ls -d "$HOME"/.cargo/registry/src/*/ 2>/dev/null | head -1)}
REPS=${REPS:-3}
OUT=${OUT:-$HERE/results}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-dircache-bench.XXXXXX")
PIDS=()

log() { echo "== $*" >&2; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "work dir kept: $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.3f}')"; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }
median() { python3 -c "import statistics,sys;print(f'{statistics.median(map(float,sys.argv[1:])):.3f}')" "$@"; }

[ -x "$EMBER" ] || { echo "build first: cargo build --release -p ember" >&2; exit 1; }
[ -d "$SRC" ] || { echo "no cargo registry at $SRC (set SRC=DIR)" >&2; exit 1; }

log "copying $SRC"
mkdir -p "$W/v2"
cp -a "$SRC/." "$W/v2/"
n=$(ls "$W/v2" | wc -l)
ADDED=$(ls "$W/v2" | sed -n "$((n / 2))p")
mkdir -p "$W/v1"
cp -a "$W/v2/." "$W/v1/"
rm -rf "${W:?}/v1/$ADDED"
V1_BYTES=$(du -sb "$W/v1" | cut -f1)
V2_BYTES=$(du -sb "$W/v2" | cut -f1)
V2_FILES=$(find "$W/v2" -type f | wc -l)
ADDED_BYTES=$(du -sb "$W/v2/$ADDED" | cut -f1)
log "v2: $V2_FILES files, $V2_BYTES bytes; v1 lacks $ADDED ($ADDED_BYTES bytes)"

CP=$(free_port)
# No --upstream: a pure build cache.
"$EMBER" cache --listen 127.0.0.1:$CP --dir "$W/cache" --max-bytes 10G >"$W/cache.log" 2>&1 &
PIDS+=($!)
NP=$(free_port)
mkdir -p "$W/nginx/www" "$W/nginx/tmp"
cat >"$W/nginx/nginx.conf" <<NGX
daemon off; user root; worker_processes 1; pid $W/nginx/pid; error_log $W/nginx/error.log;
events { worker_connections 64; }
http {
  access_log off; client_body_temp_path $W/nginx/tmp; proxy_temp_path $W/nginx/tmp;
  fastcgi_temp_path $W/nginx/tmp; uwsgi_temp_path $W/nginx/tmp; scgi_temp_path $W/nginx/tmp;
  server { listen 127.0.0.1:$NP; root $W/nginx/www; client_max_body_size 0;
           dav_methods PUT; create_full_put_path on; sendfile on; }
}
NGX
nginx -c "$W/nginx/nginx.conf" &
PIDS+=($!)
wait_port "$CP"; wait_port "$NP"
URL=http://127.0.0.1:$CP
NG=http://127.0.0.1:$NP

dc() { "$EMBER" --root "$W/root" dircache "$@" --cache "$URL" --quiet --json; }

log "ember dircache save v1, v2"
t=$(now); S1=$(dc save "$W/v1" --scope main --key reg-v1); t1=$(secs "$t" "$(now)")
t=$(now); S2=$(dc save "$W/v2" --scope main --key reg-v2); t2=$(secs "$t" "$(now)")
STORED=$(du -sb "$W/cache/dircache/chunks" | cut -f1)

log "tar | zstd | curl -T, v1 and v2"
t=$(now); tar -C "$W/v1" -c . | zstd -q -3 | curl -sf -T - "$NG/v1.tar.zst"; b1=$(secs "$t" "$(now)")
t=$(now); tar -C "$W/v2" -c . | zstd -q -3 | curl -sf -T - "$NG/v2.tar.zst"; b2=$(secs "$t" "$(now)")
Z1=$(stat -c %s "$W/nginx/www/v1.tar.zst"); Z2=$(stat -c %s "$W/nginx/www/v2.tar.zst")
tar -C "$W/v2" -cf "$W/v2.tar" .
TAR_BYTES=$(stat -c %s "$W/v2.tar")

ER=(); TR=(); XR=(); EC=(); XC=()
# CPU seconds (user+system) of one command, appended to the named array.
cpu() { local a=$1; shift; /usr/bin/time -f "%U %S" -o "$W/cpu" "$@"; eval "$a+=(\"$(awk '{print $1+$2}' "$W/cpu")\")"; }
for i in $(seq "$REPS"); do
  log "restores, round $i/$REPS"
  rm -rf "$W/r"; sync
  t=$(now); cpu EC "$EMBER" --root "$W/root" dircache restore "$W/r" --scope main --key reg-v2 \
    --cache "$URL" --quiet --json >"$W/r.json"; sync; ER+=("$(secs "$t" "$(now)")")
  R=$(cat "$W/r.json")
  rm -rf "$W/r"; mkdir -p "$W/r"; sync
  t=$(now); curl -sf "$NG/v2.tar.zst" | zstd -q -d | tar -C "$W/r" -x; sync; TR+=("$(secs "$t" "$(now)")")
  rm -rf "$W/r"; mkdir -p "$W/r"; sync
  t=$(now); cpu XC tar -C "$W/r" -xf "$W/v2.tar"; sync; XR+=("$(secs "$t" "$(now)")")
done
diff -r "$W/v2" "$W/r" >/dev/null || { echo "tar restore differs" >&2; exit 1; }
rm -rf "$W/r"; dc restore "$W/r" --scope main --key reg-v2 >/dev/null
diff -r "$W/v2" "$W/r" >/dev/null || { echo "ember restore differs from the source" >&2; exit 1; }

ER_M=$(median "${ER[@]}"); TR_M=$(median "${TR[@]}"); XR_M=$(median "${XR[@]}")
EC_M=$(median "${EC[@]}"); XC_M=$(median "${XC[@]}")
mkdir -p "$OUT"
python3 - "$OUT" <<PY
import json, sys
s1, s2, r = json.loads('''$S1'''), json.loads('''$S2'''), json.loads('''$R''')
d = dict(
  conditions=dict(source="$SRC", files=$V2_FILES, v1_bytes=$V1_BYTES, v2_bytes=$V2_BYTES,
    added="$ADDED", added_bytes=$ADDED_BYTES, reps=$REPS, nproc=$(nproc),
    kernel="$(uname -r)", date="$(date -u +%FT%TZ)", network="loopback", page_cache="warm",
    fs="$(df --output=fstype "$W" | tail -1)", load="$(cut -d' ' -f1-3 /proc/loadavg)"),
  ember=dict(save_v1=s1, save_v2=s2, save_v1_s=$t1, save_v2_s=$t2, restore_v2_s=[${ER[*]/%/,}],
    restore_v2_median_s=$ER_M, restore_v2_cpu_s=[${EC[*]/%/,}], restore_v2_cpu_median_s=$EC_M,
    stored_chunk_bytes=$STORED),
  tar_zstd=dict(save_v1_s=$b1, save_v2_s=$b2, v1_bytes=$Z1, v2_bytes=$Z2,
    restore_v2_s=[${TR[*]/%/,}], restore_v2_median_s=$TR_M),
  tar_x_uncompressed=dict(tar_bytes=$TAR_BYTES, restore_s=[${XR[*]/%/,}], median_s=$XR_M,
    cpu_s=[${XC[*]/%/,}], cpu_median_s=$XC_M),
)
e = d["ember"]
v2_share = s2["bytes_uploaded"] / max(1, r["stored_bytes"])
# Dedup alone: file bytes of both versions over the distinct (uncompressed)
# chunk bytes stored; storage: the same over what is on the cache's disk.
dedup = (s1["bytes_chunked"] + s2["bytes_chunked"]) / max(1, s1["data_bytes_uploaded"] + s2["data_bytes_uploaded"])
storage = (s1["bytes_chunked"] + s2["bytes_chunked"]) / max(1, $STORED)
d["derived"] = dict(second_save_upload_share=v2_share, dedup_ratio_two_versions=dedup,
  storage_ratio_two_versions=storage,
  tar_two_versions_bytes=$Z1 + $Z2, ember_two_versions_bytes=s1["bytes_uploaded"] + s2["bytes_uploaded"],
  restore_vs_tar_x=$ER_M / $XR_M, restore_vs_tar_zstd=$ER_M / $TR_M)
json.dump(d, open(sys.argv[1] + "/latest.json", "w"), indent=2)
mb = lambda b: f"{b/1e6:.1f} MB"
md = f"""| cargo registry src ({$V2_FILES} files, {mb($V2_BYTES)}) | ember dircache | tar -c \\| zstd -3 \\| curl -T (nginx) |
| --- | --- | --- |
| save v1 (cold cache) | {$t1:.2f} s, sent {mb(s1['bytes_uploaded'])} | {$b1:.2f} s, sent {mb($Z1)} |
| save v2 (v1 + crate {d['conditions']['added']}, {mb($ADDED_BYTES)}) | {$t2:.2f} s, sent {mb(s2['bytes_uploaded'])} ({s2['chunks_uploaded']} of {s2['unique_chunks']} chunks) | {$b2:.2f} s, sent {mb($Z2)} |
| stored for both versions | {mb($STORED)} | {mb($Z1 + $Z2)} |
| restore v2 (median of {$REPS}) | {$ER_M:.2f} s | {$TR_M:.2f} s (curl \\| zstd -d \\| tar -x) |

- Second save uploads {v2_share*100:.1f} % of the entry's stored bytes. Across the two versions, dedup alone
  (file bytes of v1 + v2 over distinct chunk bytes) is {dedup:.2f}x, and with compression (over bytes on the
  cache's disk) {storage:.1f}x; the two tar.zst archives store {(s1["bytes_chunked"] + s2["bytes_chunked"]) / ($Z1 + $Z2):.1f}x.
- Restore vs \`tar -x\` of the uncompressed tar from local disk ({$XR_M:.2f} s): {$ER_M / $XR_M:.2f}x;
  vs curl | zstd -d | tar -x: {$ER_M / $TR_M:.2f}x. CPU (user + system, medians): ember restore
  {$EC_M:.2f} s, \`tar -x\` {$XC_M:.2f} s (the cache server's own CPU not counted).
- Conditions: {$(nproc)} cores shared with other jobs (load {d['conditions']['load']}), work directory on
  {d['conditions']['fs']}, loopback, warm page cache, zstd level 3 on both sides, ember with 8 requests of up to
  32 chunks in flight, every restore timed through a final sync; {d['conditions']['date']}.
"""
open(sys.argv[1] + "/latest.md", "w").write(md)
print(md)
PY
