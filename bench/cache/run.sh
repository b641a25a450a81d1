#!/usr/bin/env bash
# ember cache vs docker-registry (CNCF distribution 2.8) in proxy mode, side by
# side in one run, against the same rate-limited upstream; nginx serving the
# same blob files as the practical limit for cache hits.
#
#   1. cold pull of the `multi` fixture (7 layers, 110 MB) with skopeo
#   2. warm pull of the same image (second skopeo copy)
#   3. 32 concurrent clients on one uncached 200 MB blob
#   4. cache-hit throughput (8 parallel curls x 4 downloads of the 200 MB blob),
#      with nginx serving the same file
#   5. peak RSS of each server during 3 and 4
#
# The upstream is a docker-registry in its own network namespace behind a veth
# pair whose namespace side has a tbf qdisc (default 400 mbit = 50 MB/s).
# Needs root (netns, tc). Measurements, not tests: nothing fails on a number.
# Writes bench/cache/results/latest.md and latest.json.
set -euo pipefail

RATE=${RATE:-400mbit}
CLIENTS=${CLIENTS:-32}
BIG_MB=${BIG_MB:-200}
HIT_PAR=${HIT_PAR:-8}
HIT_REPS=${HIT_REPS:-4}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
EMBER=${EMBER:-$ROOT/target/release/ember}
FIXTURES=${EMBER_FIXTURES:-$ROOT/target/release/ember-fixtures}
OUT=${OUT:-$HERE/results}
W=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-cache-bench.XXXXXX")
NS=embc$$
VH=vh$$
VN=vn$$
UP_IP=10.213.$((RANDOM % 200 + 1)).2
HOST_IP=${UP_IP%.2}.1
UP=$UP_IP:5000
PIDS=()

log() { echo "== $*" >&2; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip link del "$VH" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "work dir kept: $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

registry_config() { # DIR ADDR [PROXY_URL]
  mkdir -p "$1/storage"
  cat >"$1/config.yml" <<EOF
version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: false}}
storage:
  filesystem: {rootdirectory: "$1/storage"}
  delete: {enabled: true}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: "$2", secret: bench-not-a-secret}
health: {storagedriver: {enabled: false}}
EOF
  [ -n "${3:-}" ] && printf 'proxy:\n  remoteurl: "%s"\n' "$3" >>"$1/config.yml"
  true
}

wait_http() { for _ in $(seq 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }

# Bytes of successful blob GETs in a registry access log (combined format).
upstream_blob_bytes() { awk '$6 ~ /GET/ && $7 ~ /\/blobs\// && ($9 == 200 || $9 == 206) {s += $10} END {printf "%.0f\n", s}' "$1"; }
upstream_blob_gets() { grep -c "\"GET [^ ]*/blobs/$2" "$1" || true; }

peak_rss_start() { # PID FILE: samples VmRSS (kB) every 50 ms into FILE's max
  ( m=0; while kill -0 "$1" 2>/dev/null; do
      r=$(awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0)
      [ "${r:-0}" -gt "$m" ] && m=$r && echo "$m" >"$2"
      sleep 0.05; done ) >/dev/null 2>&1 &
  echo $!
}

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }

# ---------------------------------------------------------------- build
if [ -z "${NO_BUILD:-}" ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p ember -p ember-testkit --bin ember --bin ember-fixtures >&2)
fi

# ---------------------------------------------------------------- upstream in a netns, rate limited
log "upstream: docker-registry in netns $NS at $UP, egress $RATE"
ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$HOST_IP/24" dev "$VH"; ip link set "$VH" up
ip netns exec "$NS" ip addr add "$UP_IP/24" dev "$VN"
ip netns exec "$NS" ip link set "$VN" up
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" tc qdisc add dev "$VN" root tbf rate "$RATE" burst 256kb latency 50ms
registry_config "$W/origin" "$UP"
ip netns exec "$NS" docker-registry serve "$W/origin/config.yml" >"$W/origin/access.log" 2>"$W/origin/registry.log" &
PIDS+=($!)
wait_http "http://$UP/v2/"

log "pushing fixtures and a ${BIG_MB} MB blob to the upstream"
"$FIXTURES" push --registry "$UP" multi >&2
head -c "${BIG_MB}M" /dev/urandom >"$W/big.bin"
BIG_DIGEST="sha256:$(sha256sum "$W/big.bin" | cut -d' ' -f1)"
loc=$(curl -fsS -D - -o /dev/null -X POST "http://$UP/v2/bench/big/blobs/uploads/" | awk -F': ' 'tolower($1)=="location"{print $2}' | tr -d '\r')
case "$loc" in http*) ;; *) loc="http://$UP$loc" ;; esac
sep='?'; case "$loc" in *\?*) sep='&' ;; esac
curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$W/big.bin" "${loc}${sep}digest=$BIG_DIGEST" -o /dev/null
: >"$W/origin/access.log.mark"

# ---------------------------------------------------------------- the two caches and nginx
P_EMBER=$(free_port); P_DIST=$(free_port); P_NGINX=$(free_port)
start_caches() {
  rm -rf "$W/ember" "$W/dist"; mkdir -p "$W/ember"
  "$EMBER" --log warn cache --listen "127.0.0.1:$P_EMBER" --dir "$W/ember/data" --max-bytes 20G \
    --upstream "http://$UP" 2>"$W/ember/log" &
  EMBER_PID=$!; PIDS+=($EMBER_PID)
  registry_config "$W/dist" "127.0.0.1:$P_DIST" "http://$UP"
  docker-registry serve "$W/dist/config.yml" >"$W/dist/access.log" 2>"$W/dist/registry.log" &
  DIST_PID=$!; PIDS+=($DIST_PID)
  wait_http "http://127.0.0.1:$P_EMBER/v2/"; wait_http "http://127.0.0.1:$P_DIST/v2/"
}
stop_caches() { kill "$EMBER_PID" "$DIST_PID" 2>/dev/null || true; wait "$EMBER_PID" "$DIST_PID" 2>/dev/null || true; }

origin_mark() { wc -l <"$W/origin/access.log"; }
origin_since() { tail -n +"$(($1 + 1))" "$W/origin/access.log" >"$W/origin/slice.log"; echo "$W/origin/slice.log"; }

declare -A R
start_caches

# ---------------------------------------------------------------- 1+2: cold and warm pull (sequential: one shared upstream link)
for name in ember dist; do
  port=$([ $name = ember ] && echo "$P_EMBER" || echo "$P_DIST")
  for phase in cold warm; do
    m=$(origin_mark); t0=$(now)
    skopeo copy --src-tls-verify=false "docker://127.0.0.1:$port/ember/multi:latest" "dir:$W/pull-$name-$phase" >/dev/null
    R[$name.$phase.s]=$(since "$t0")
    sleep 1 # distribution logs/fetches in the background after answering
    s=$(origin_since "$m")
    R[$name.$phase.upbytes]=$(upstream_blob_bytes "$s")
    R[$name.$phase.upgets]=$(grep -c '"GET [^ ]*/blobs/' "$s" || true)
    log "$name $phase pull: ${R[$name.$phase.s]} s, upstream blob GETs ${R[$name.$phase.upgets]}, bytes ${R[$name.$phase.upbytes]}"
  done
done

# ---------------------------------------------------------------- 3: N clients on one uncached blob
for name in ember dist; do
  port=$([ $name = ember ] && echo "$P_EMBER" || echo "$P_DIST")
  pid=$([ $name = ember ] && echo "$EMBER_PID" || echo "$DIST_PID")
  : >"$W/$name.rss"; sampler=$(peak_rss_start "$pid" "$W/$name.rss")
  m=$(origin_mark); t0=$(now); cp=()
  for i in $(seq "$CLIENTS"); do
    if [ "$i" -le 4 ]; then # a few clients also check the bytes
      ( curl -fsS "http://127.0.0.1:$port/v2/bench/big/blobs/$BIG_DIGEST" | sha256sum | cut -d' ' -f1 >"$W/$name.sum.$i" ) &
    else
      curl -fsS -o /dev/null -w '%{http_code} %{size_download}\n' "http://127.0.0.1:$port/v2/bench/big/blobs/$BIG_DIGEST" >"$W/$name.curl.$i" &
    fi
    cp+=($!)
  done
  for p in "${cp[@]}"; do wait "$p" || true; done
  R[$name.fan.s]=$(since "$t0")
  sleep 2
  s=$(origin_since "$m")
  R[$name.fan.upgets]=$(upstream_blob_gets "$s" "$BIG_DIGEST")
  R[$name.fan.upbytes]=$(upstream_blob_bytes "$s")
  ok=0; for i in $(seq 5 "$CLIENTS"); do grep -q "^200 $((BIG_MB * 1024 * 1024))$" "$W/$name.curl.$i" 2>/dev/null && ok=$((ok + 1)); done
  for i in 1 2 3 4; do [ "$(cat "$W/$name.sum.$i" 2>/dev/null)" = "${BIG_DIGEST#sha256:}" ] && ok=$((ok + 1)); done
  R[$name.fan.ok]=$ok
  log "$name $CLIENTS clients: ${R[$name.fan.s]} s, upstream GETs ${R[$name.fan.upgets]}, bytes ${R[$name.fan.upbytes]}, complete+correct $ok/$CLIENTS"
  kill "$sampler" 2>/dev/null || true
done

# ---------------------------------------------------------------- 4: hit throughput, with nginx on the same file
mkdir -p "$W/nginx/www/v2/bench/big/blobs" "$W/nginx/tmp"
# A hard link: the very file the cache serves.
ln "$W/ember/data/blobs/sha256/${BIG_DIGEST#sha256:}" "$W/nginx/www/v2/bench/big/blobs/$BIG_DIGEST"
cat >"$W/nginx/nginx.conf" <<EOF
user root;
worker_processes 2;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path $W/nginx/tmp; proxy_temp_path $W/nginx/tmp;
  fastcgi_temp_path $W/nginx/tmp; uwsgi_temp_path $W/nginx/tmp; scgi_temp_path $W/nginx/tmp;
  server { listen 127.0.0.1:$P_NGINX; root $W/nginx/www; default_type application/octet-stream; }
}
EOF
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx"
NGINX_PID=$(cat "$W/nginx/nginx.pid"); PIDS+=($NGINX_PID)
wait_http "http://127.0.0.1:$P_NGINX/v2/bench/big/blobs/$BIG_DIGEST"

for name in ember dist nginx; do
  case $name in ember) port=$P_EMBER pid=$EMBER_PID ;; dist) port=$P_DIST pid=$DIST_PID ;; nginx) port=$P_NGINX pid="" ;; esac
  # one warm-up so all three read from the page cache
  curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/bench/big/blobs/$BIG_DIGEST"
  [ -n "$pid" ] && { : >"$W/$name.hitrss"; sampler=$(peak_rss_start "$pid" "$W/$name.hitrss"); }
  t0=$(now)
  for c in $(seq "$HIT_PAR"); do
    ( for r in $(seq "$HIT_REPS"); do curl -fsS -o /dev/null "http://127.0.0.1:$port/v2/bench/big/blobs/$BIG_DIGEST"; done ) &
    hp[$c]=$!
  done
  wait "${hp[@]}"
  secs=$(since "$t0")
  R[$name.hit.s]=$secs
  R[$name.hit.mbs]=$(echo "$HIT_PAR * $HIT_REPS * $BIG_MB * 1.048576 / $secs" | bc -l | xargs printf '%.0f')
  [ -n "$pid" ] && kill "$sampler" 2>/dev/null || true
  log "$name hits: $((HIT_PAR * HIT_REPS)) x ${BIG_MB} MiB in $secs s = ${R[$name.hit.mbs]} MB/s"
done
kill "$NGINX_PID" 2>/dev/null || true

mb() { echo "${1:-0} / 1000000" | bc -l | xargs printf '%.0f'; }
kb2mb() { echo "${1:-0} / 1024" | bc -l | xargs printf '%.0f'; }
rss() { cat "$W/$1" 2>/dev/null || echo 0; }

mkdir -p "$OUT"
cpu=$(lscpu | awk -F: '/Model name/ {gsub(/^ +/,"",$2); print $2; exit}')
{
  echo "# ember cache vs docker-registry proxy ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Conditions: $(nproc) cores ($cpu), $(free -g | awk '/Mem/ {print $2}') GiB RAM, kernel $(uname -r);"
  echo "upstream docker-registry $(docker-registry --version 2>/dev/null | awk '{print $3}') in a network namespace, egress tbf $RATE;"
  echo "clients, caches and nginx on loopback in the host namespace; cache dirs on $(df --output=fstype "$W" | tail -1); page cache not dropped."
  echo
  echo "| scenario | ember cache | docker-registry proxy | nginx |"
  echo "| --- | --- | --- | --- |"
  echo "| cold pull multi (skopeo, 110 MB, 7 layers): time | ${R[ember.cold.s]} s | ${R[dist.cold.s]} s | |"
  echo "| cold pull: upstream blob GETs / MB | ${R[ember.cold.upgets]} / $(mb "${R[ember.cold.upbytes]}") | ${R[dist.cold.upgets]} / $(mb "${R[dist.cold.upbytes]}") | |"
  echo "| warm pull multi: time | ${R[ember.warm.s]} s | ${R[dist.warm.s]} s | |"
  echo "| warm pull: upstream blob GETs | ${R[ember.warm.upgets]} | ${R[dist.warm.upgets]} | |"
  echo "| $CLIENTS clients, one uncached ${BIG_MB} MiB blob: total time | ${R[ember.fan.s]} s | ${R[dist.fan.s]} s | |"
  echo "| ... upstream GETs of that blob / MB | ${R[ember.fan.upgets]} / $(mb "${R[ember.fan.upbytes]}") | ${R[dist.fan.upgets]} / $(mb "${R[dist.fan.upbytes]}") | |"
  echo "| ... clients complete and correct | ${R[ember.fan.ok]}/$CLIENTS | ${R[dist.fan.ok]}/$CLIENTS | |"
  echo "| ... server peak RSS | $(kb2mb "$(rss ember.rss)") MB | $(kb2mb "$(rss dist.rss)") MB | |"
  echo "| hits: $HIT_PAR parallel x $HIT_REPS x ${BIG_MB} MiB | ${R[ember.hit.mbs]} MB/s | ${R[dist.hit.mbs]} MB/s | ${R[nginx.hit.mbs]} MB/s |"
  echo "| ... server peak RSS | $(kb2mb "$(rss ember.hitrss)") MB | $(kb2mb "$(rss dist.hitrss)") MB | |"
} >"$OUT/latest.md"
{
  printf '{"rate":"%s","clients":%s,"big_mb":%s' "$RATE" "$CLIENTS" "$BIG_MB"
  for k in "${!R[@]}"; do printf ',"%s":"%s"' "$k" "${R[$k]}"; done
  printf ',"ember_fan_rss_kb":%s,"dist_fan_rss_kb":%s,"ember_hit_rss_kb":%s,"dist_hit_rss_kb":%s}\n' \
    "$(rss ember.rss)" "$(rss dist.rss)" "$(rss ember.hitrss)" "$(rss dist.hitrss)"
} >"$OUT/latest.json"
stop_caches
cat "$OUT/latest.md"
