#!/usr/bin/env bash
# Ember benchmarks, side by side with the standard tools on the same machine:
#   1. cold pull + unpack: ember pull vs podman pull vs skopeo copy + umoci unpack
#   2. hot start of `true`: ember run --rm vs bare runc run vs podman run --rm
# Writes bench/results/latest.json (raw numbers + conditions) and
# bench/results/latest.md (tables ready to paste). See bench/README.md.
#
# These are measurements, not tests: nothing here passes or fails on a number.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/run.sh [OPTIONS]

  --runs N          cold-pull runs per image and tool (default 5)
  --hot-runs N      hot-start runs per command (default 20, after 3 warm-ups)
  --warmup N        hot-start warm-up runs per command (default 3)
  --no-hyperfine    skip the hyperfine cross-check of the hot start
  --images "A B"    fixtures to pull (default "busybox big multi")
  --quick           smoke run: --runs 1 --hot-runs 5 --warmup 1
  --drop-caches     sync + drop the page cache before every cold pull (default: not dropped)
  --tmpfs           put the cold-pull stores on a tmpfs (takes the disk out; default: the
                    work directory's filesystem)
  --skip-pull       skip the cold-pull benchmark
  --skip-hot        skip the hot-start benchmark
  --no-build        use the binaries in target/release as they are
  --rev REV         build and measure the committed tree REV (git archive into a
                    scratch dir; target dir cached in $BENCH_TMPDIR/ember-bench-target),
                    leaving the work tree and target/ alone
  --out DIR         results directory (default bench/results)
  --keep            keep the work directory (printed at the end)
  -h, --help        this text

Environment: EMBER / EMBER_FIXTURES (binaries, default target/release/...),
BENCH_TMPDIR (parent of the work directory, default /var/tmp).
EOF
}

RUNS=5
HOT_RUNS=20
HYPERFINE=1
WARMUP=3
IMAGES="busybox big multi"
DROP_CACHES=0
TMPFS=0
SKIP_PULL=0
SKIP_HOT=0
BUILD=1
KEEP=0
REV=
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=$HERE/results

while (($#)); do
  case $1 in
    --runs) RUNS=$2; shift ;;
    --hot-runs) HOT_RUNS=$2; shift ;;
    --no-hyperfine) HYPERFINE=0 ;;
    --warmup) WARMUP=$2; shift ;;
    --images) IMAGES=$2; shift ;;
    --quick) RUNS=1; HOT_RUNS=5; WARMUP=1 ;;
    --drop-caches) DROP_CACHES=1 ;;
    --tmpfs) TMPFS=1 ;;
    --skip-pull) SKIP_PULL=1 ;;
    --skip-hot) SKIP_HOT=1 ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --rev) REV=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
((RUNS >= 1 && HOT_RUNS >= 1 && WARMUP >= 0)) || { echo "bad --runs/--hot-runs/--warmup" >&2; exit 2; }

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- setup
for t in docker-registry skopeo umoci podman runc hyperfine jq curl ss; do
  command -v "$t" >/dev/null || die "$t not found: run scripts/install-deps.sh"
done
[ "$(id -u)" -eq 0 ] || die "run as root (runc, overlay mounts, podman's rootful store)"

GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$([ -n "$(git -C "$REPO" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null)" ] && echo true || echo false)
if [ -n "$REV" ]; then
  GIT_REV=$(git -C "$REPO" rev-parse --short "$REV^{commit}") || die "no such revision: $REV"
  GIT_DIRTY=false
  src=${BENCH_TMPDIR:-/var/tmp}/ember-bench-src
  tgt=${BENCH_TMPDIR:-/var/tmp}/ember-bench-target
  log "building ember at $GIT_REV from a clean export ($src, target $tgt)"
  rm -rf "$src"; mkdir -p "$src" "$tgt"
  git -C "$REPO" archive "$GIT_REV" | tar -x -C "$src"
  (cd "$src" && CARGO_TARGET_DIR=$tgt cargo build --release -q -p ember -p ember-testkit)
  EMBER=$tgt/release/ember
  EMBER_FIXTURES=$tgt/release/ember-fixtures
  EMBER_SOURCE="git $GIT_REV (clean export)"
elif ((BUILD)) && [ -z "${EMBER:-}" ]; then
  log "building ember (cargo build --release -p ember -p ember-testkit)"
  (cd "$REPO" && cargo build --release -q -p ember -p ember-testkit)
fi
EMBER=${EMBER:-$REPO/target/release/ember}
EMBER_FIXTURES=${EMBER_FIXTURES:-$REPO/target/release/ember-fixtures}
[ -x "$EMBER" ] || die "$EMBER missing (build it, or drop --no-build)"
[ -x "$EMBER_FIXTURES" ] || die "$EMBER_FIXTURES missing"
if [ -z "${EMBER_SOURCE:-}" ]; then
  EMBER_SOURCE="work tree at git $GIT_REV$([ "$GIT_DIRTY" = true ] && echo " with uncommitted changes in crates/" || true)"
  ((BUILD)) || EMBER_SOURCE="$EMBER_SOURCE (not rebuilt: binary from $(date -u -r "$EMBER" +%Y-%m-%dT%H:%M:%SZ))"
fi
EMBER_SHA=$(sha256sum "$EMBER" | cut -c1-16)

mkdir -p "${BENCH_TMPDIR:-/var/tmp}" "$OUT"
WORK=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/ember-bench.XXXXXX")
RAW=$WORK/raw
SHORT=$(mktemp -d /tmp/ebr.XXXXXX)
mkdir -p "$RAW" "$WORK/bin"
# Snapshot the binaries: a rebuild in the tree during the run must not
# change what is measured.
cp "$EMBER" "$WORK/bin/ember"
cp "$EMBER_FIXTURES" "$WORK/bin/ember-fixtures"
EMBER=$WORK/bin/ember
EMBER_FIXTURES=$WORK/bin/ember-fixtures
REGISTRY_PID=

# Unmounts everything at or below DIR (deepest first), then removes it
# without crossing into any mount that could not be removed.
clean_dir() {
  local dir=$1 m
  [ -e "$dir" ] || return 0
  # mountinfo field 5 is the mount point (octal escapes for spaces; our
  # paths have none).
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
  rm -rf --one-file-system "$dir"
}

cleanup() {
  local rc=$?
  set +e
  # runc containers we may have left behind (interrupted hot runs)
  if [ -d "$WORK/runc-state" ]; then
    for id in $(runc --root "$WORK/runc-state" list -q 2>/dev/null); do
      runc --root "$WORK/runc-state" delete -f "$id" >/dev/null 2>&1
    done
  fi
  if [ -n "$REGISTRY_PID" ]; then
    kill "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null
  fi
  clean_dir "$SHORT"
  if ((KEEP)); then
    log "work directory kept: $WORK"
  else
    clean_dir "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------- registry
start_registry() {
  local dir=$WORK/registry port
  mkdir -p "$dir/storage"
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    port=$((20000 + RANDOM % 40000))
    [ -z "$(ss -Htln "sport = :$port")" ] || continue
    cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  secret: ember-bench-not-a-secret
health:
  storagedriver:
    enabled: false
YAML
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    REGISTRY_PID=$!
    for _ in $(seq 100); do
      if curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1; then
        REGISTRY=127.0.0.1:$port
        return 0
      fi
      kill -0 "$REGISTRY_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill "$REGISTRY_PID" 2>/dev/null; wait "$REGISTRY_PID" 2>/dev/null || true
    REGISTRY_PID=
  done
  cat "$dir/registry.log" >&2
  die "docker-registry did not start"
}

start_registry
log "registry: docker-registry on $REGISTRY (storage $WORK/registry/storage)"
log "pushing fixtures: $(echo busybox $IMAGES | tr ' ' '\n' | sort -u | tr '\n' ' ')"
# shellcheck disable=SC2086,SC2046
"$EMBER_FIXTURES" push --registry "$REGISTRY" $(echo busybox $IMAGES | tr ' ' '\n' | sort -u) >"$RAW/push.log" 2>&1 \
  || { cat "$RAW/push.log" >&2; die "ember-fixtures push failed"; }

ref() { echo "$REGISTRY/ember/$1:latest"; }

# Compressed bytes of an image's layers, from its manifest in the registry.
compressed_bytes() {
  curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
    "http://$REGISTRY/v2/ember/$1/manifests/latest" | jq '[.layers[].size] | add'
}

PODMAN_GLOBAL=(--storage-driver overlay --runtime runc --cgroup-manager cgroupfs --events-backend file)
# podman against a throwaway store: podman_in DIR args... The store is in
# DIR; run state (podman refuses a runroot path over 50 characters) and
# libpod's tmpdir go under a short directory named after DIR's checksum.
podman_in() {
  local d=$1 rr; shift
  rr=$(podman_runroot "$d")
  podman --root "$d/root" --runroot "$rr/run" --tmpdir "$rr/tmp" "${PODMAN_GLOBAL[@]}" "$@"
}
podman_runroot() { echo "$SHORT/$(echo "$1" | cksum | cut -d' ' -f1)"; }

# Microseconds since the epoch, without forking.
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

# Runs a command, output to files; sets DT_US (wall microseconds) and returns
# the command's status.
timed() {
  local out=$1 err=$2 t0 t1 rc=0; shift 2
  t0=$(now_us)
  "$@" >"$out" 2>"$err" || rc=$?
  t1=$(now_us)
  DT_US=$((t1 - t0))
  return $rc
}

CACHES_DROPPED=false
if ((DROP_CACHES)); then
  if (sync; echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    CACHES_DROPPED=true
  else
    log "warning: /proc/sys/vm/drop_caches is not writable here; caches will NOT be dropped"
  fi
fi

# Before every timed cold pull: flush what earlier runs left dirty (so its
# writeback is not charged to this run) and optionally drop the page cache.
settle() {
  sync
  if [ "$CACHES_DROPPED" = true ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ----------------------------------------------------------- cold pulls
# "floor" is not a client: it is what this machine needs for the same
# bytes without any client, measured in the same rotation (see README).
# ember-norecord: the same pull without the tree record `ember store verify`
# checks layers against (a hidden flag), to measure what recording costs.
PULL_TOOLS=(ember ember-norecord podman skopeo+umoci floor)
: >"$RAW/pull.jsonl"

# Every run gets a fresh directory, and nothing is deleted until all runs
# are done (or, with --tmpfs, until an image's runs are done): on ext4
# without a journal (this machine), creating files soon after deleting
# many is slow, since the inode allocator skips inodes deleted in the
# last 60 s (300 s while their inode table block is dirty). Deleting one
# run's tree before the next would charge that to the next tool.
PULL_AREA=$WORK/pull
mkdir -p "$PULL_AREA"
if ((TMPFS)); then
  avail_kb=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
  mount -t tmpfs -o "size=$((avail_kb * 6 / 10))k,mode=0755" ember-bench "$PULL_AREA"
fi

# The floor's inputs, per image: the gzip blobs and their uncompressed tars
# (both then in the page cache).
floor_prepare() {
  local img=$1 fs=$WORK/floor-src/$1 m i=0 dg mt
  mkdir -p "$fs"
  skopeo copy -q --src-tls-verify=false "docker://$(ref "$img")" "oci:$fs/layout:latest" >/dev/null
  m=$(jq -r '.manifests[0].digest | sub("^sha256:"; "")' "$fs/layout/index.json")
  : >"$fs/blobs"
  while read -r dg mt; do
    i=$((i + 1))
    case $mt in
      *gzip) echo "$fs/layout/blobs/sha256/$dg" >>"$fs/blobs"; gzip -dc "$fs/layout/blobs/sha256/$dg" >"$fs/$i.tar" ;;
      *tar) cp "$fs/layout/blobs/sha256/$dg" "$fs/$i.tar" ;;
      *) log "  floor: layer media type $mt not handled; no floor for $img"; return 1 ;;
    esac
  done < <(jq -r '.layers[] | "\(.digest | sub("^sha256:"; "")) \(.mediaType)"' "$fs/layout/blobs/sha256/$m")
  ls "$fs"/*.tar | sort -V >"$fs/tars"
}
floor_gunzip() { local b; while read -r b; do gzip -dc "$b" >/dev/null; done <"$1"; }
floor_untar() { local t; mkdir -p "$2"; while read -r t; do tar -xf "$t" -C "$2"; done <"$1"; }

# pull_once TOOL IMAGE ROUND POS: one cold pull into a fresh directory.
pull_once() {
  local tool=$1 img=$2 round=$3 pos=$4 r d rc=0 sync_us parts='{}' detail='null' err
  r=$(ref "$img")
  d=$PULL_AREA/$img/r$round-$tool
  mkdir -p "$d"
  # Stores are created before the clock starts: a node's store exists
  # already; only the image is new.
  case $tool in
    ember | ember-norecord) "$EMBER" --root "$d/store" images >/dev/null ;;
    podman) podman_in "$d" images >/dev/null ;;
  esac
  settle
  case $tool in
    ember)
      timed "$d/out" "$d/err" "$EMBER" --root "$d/store" pull --json "$r" || rc=$?
      ((rc)) || detail=$(jq -c . "$d/out" 2>/dev/null || echo null)
      ;;
    ember-norecord)
      timed "$d/out" "$d/err" "$EMBER" --root "$d/store" pull --json --no-tree-record "$r" || rc=$?
      ;;
    podman)
      timed "$d/out" "$d/err" podman_in "$d" pull -q --tls-verify=false "$r" || rc=$?
      ;;
    skopeo+umoci)
      local t_sk t_um
      timed "$d/out" "$d/err" skopeo copy -q --src-tls-verify=false "docker://$r" "oci:$d/layout:latest" || rc=$?
      t_sk=$DT_US
      if ((rc == 0)); then
        timed "$d/out2" "$d/err" umoci unpack --image "$d/layout:latest" "$d/bundle" || rc=$?
        t_um=$DT_US
        DT_US=$((t_sk + t_um))
        parts=$(jq -nc --argjson s "$t_sk" --argjson u "$t_um" '{skopeo_s: ($s/1e6), umoci_s: ($u/1e6)}')
      fi
      ;;
    floor)
      local t_gz t_tar fs=$WORK/floor-src/$img
      timed /dev/null "$d/err" floor_gunzip "$fs/blobs" || rc=$?
      t_gz=$DT_US
      sync
      if ((rc == 0)); then
        timed /dev/null "$d/err" floor_untar "$fs/tars" "$d/rootfs" || rc=$?
        t_tar=$DT_US
        DT_US=$t_tar
        parts=$(jq -nc --argjson g "$t_gz" --argjson t "$t_tar" '{gunzip_s: ($g/1e6), tar_x_s: ($t/1e6)}')
      fi
      ;;
  esac
  local secs
  secs=$(jq -n --argjson us "$DT_US" '$us/1e6')
  # Time to durable: what a `sync` right after the tool costs (the tools
  # do not fsync what they unpack; ember pull defaults to no syncfs either).
  local s0; s0=$(now_us); sync; sync_us=$(( $(now_us) - s0 ))
  if ((rc)); then
    err=$(tail -c 600 "$d/err")
    log "  $tool $img round $round FAILED (exit $rc): $err"
    jq -nc --arg tool "$tool" --arg img "$img" --argjson round "$round" --argjson pos "$pos" \
      --argjson rc "$rc" --arg err "$err" \
      '{phase:"pull", tool:$tool, image:$img, round:$round, position:$pos, ok:false, exit:$rc, error:$err}' >>"$RAW/pull.jsonl"
  else
    log "  $(printf '%-13s %-8s round %d: %7.3f s  (+sync %.3f s)' "$tool" "$img" "$round" "$secs" "$(jq -n "$sync_us/1e6")")$([ "$tool" = floor ] && jq -r '"  [tar -x \(.tar_x_s * 1000 | round / 1000) s; gunzip \(.gunzip_s * 1000 | round / 1000) s]"' <<<"$parts")"
    jq -nc --arg tool "$tool" --arg img "$img" --argjson round "$round" --argjson pos "$pos" \
      --argjson s "$secs" --argjson sync "$(jq -n "$sync_us/1e6")" --argjson parts "$parts" --argjson detail "$detail" \
      '{phase:"pull", tool:$tool, image:$img, round:$round, position:$pos, ok:true, seconds:$s, sync_after_s:$sync}
       + (if $parts != {} then {parts:$parts} else {} end)
       + (if $detail != null then {ember_pull_json:$detail} else {} end)' >>"$RAW/pull.jsonl"
  fi
  # What the image unpacks to (from ember's first run, untimed).
  if [ "$tool" = ember ] && ((rc == 0)) && [ -z "${IMG_UNPACKED[$img]:-}" ]; then
    IMG_UNPACKED[$img]=$(du -sb "$d/store/layers" | cut -f1)
    IMG_FILES[$img]=$(find "$d/store/layers" -mindepth 2 | wc -l)
  fi
}

declare -A IMG_BYTES IMG_UNPACKED IMG_FILES
# The filesystem the stores are on, as it matters here (see above).
fs_desc() {
  local src fstype opts extra=
  read -r src fstype opts < <(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$1")
  if [ "$fstype" = ext4 ] && [ -d /proc/fs/jbd2 ]; then
    compgen -G "/proc/fs/jbd2/${src##*/}-*" >/dev/null || extra=", no journal"
  fi
  echo "$fstype$extra ($src; ${opts})"
}
PULL_FS=$(fs_desc "$PULL_AREA")
for img in $IMAGES; do
  IMG_BYTES[$img]=$(compressed_bytes "$img")
done

if ((SKIP_PULL == 0)); then
  avail_kb=$(df -Pk "$PULL_AREA" | awk 'NR==2{print $4}')
  need_kb=0
  for img in $IMAGES; do need_kb=$((need_kb + RUNS * IMG_BYTES[$img] * 9 / 1024)); done
  ((avail_kb > need_kb)) || log "warning: about $((need_kb / 1048576)) GiB needed in $PULL_AREA, $((avail_kb / 1048576)) GiB free"
  log "cold pull + unpack: $RUNS run(s) per image and tool, caches dropped: $CACHES_DROPPED, stores on $(df -PT "$PULL_AREA" | awk 'NR==2{print $2}')"
  for img in $IMAGES; do
    HAS_FLOOR=1
    floor_prepare "$img" || HAS_FLOOR=0
    log " $img: $(jq -n "${IMG_BYTES[$img]}/1e6*10|round/10") MB compressed"
    for ((round = 1; round <= RUNS; round++)); do
      n=${#PULL_TOOLS[@]}
      # Rotate the order every round, and reverse it every other round, so
      # each tool runs first, middle and last about equally often.
      order=()
      for ((k = 0; k < n; k++)); do order+=("${PULL_TOOLS[$(((k + round - 1) % n))]}"); done
      if ((round % 2 == 0)); then
        rev=(); for ((k = n - 1; k >= 0; k--)); do rev+=("${order[$k]}"); done; order=("${rev[@]}")
      fi
      pos=0
      for tool in "${order[@]}"; do
        [ "$tool" = floor ] && ((HAS_FLOOR == 0)) && continue
        pos=$((pos + 1))
        pull_once "$tool" "$img" "$round" "$pos"
      done
    done
    log " $img unpacks to $(jq -n "${IMG_UNPACKED[$img]:-0}/1e6*10|round/10") MB in ${IMG_FILES[$img]:-?} entries"
    if ((TMPFS)); then clean_dir "$PULL_AREA/$img"; fi
  done
fi

# ------------------------------------------------------------ hot start
HOT_JSON_FILES=()
: >"$RAW/hot-timings.jsonl"
: >"$RAW/hot-loop.jsonl"
declare -A HOT_FAIL=()
if ((SKIP_HOT == 0)); then
  IMG=$(ref busybox)
  log "hot start: preparing ember store, runc bundle, podman store"
  ER=$WORK/hot/ember
  "$EMBER" --root "$ER" pull -q "$IMG" >/dev/null

  # A bare runc bundle of the same image: skopeo + umoci unpack, then the
  # config made non-interactive, `true`, and rlimits within our hard limits.
  skopeo copy -q --src-tls-verify=false "docker://$IMG" "oci:$WORK/hot/layout:latest"
  BUNDLE=$WORK/hot/bundle
  umoci unpack --image "$WORK/hot/layout:latest" "$BUNDLE" >/dev/null
  HN=$(ulimit -Hn); HU=$(ulimit -Hu)
  [ "$HU" = unlimited ] && HU=4294967295
  [ "$HN" = unlimited ] && HN=4294967295
  jq --argjson hn "$HN" --argjson hu "$HU" '
    .process.terminal = false
    | .process.args = ["/bin/true"]
    | .process.rlimits = [(.process.rlimits // [])[]
        | (if .type == "RLIMIT_NOFILE" then $hn elif .type == "RLIMIT_NPROC" then $hu else null end) as $max
        | if $max == null then . else .hard = ([.hard, $max] | min) | .soft = ([.soft, .hard] | min) end]
  ' "$BUNDLE/config.json" >"$BUNDLE/config.json.new"
  mv "$BUNDLE/config.json.new" "$BUNDLE/config.json"
  mkdir -p "$WORK/runc-state"

  PH=$WORK/hot/podman
  podman_in "$PH" pull -q --tls-verify=false "$IMG" >/dev/null
  PRR=$(podman_runroot "$PH")
  PRUN="podman --root $PH/root --runroot $PRR/run --tmpdir $PRR/tmp ${PODMAN_GLOBAL[*]} run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"

  declare -A HOT_CMD=(
    [ember]="$EMBER --root $ER run --rm $IMG true"
    [runc]="runc --root $WORK/runc-state run --bundle $BUNDLE"
    [podman]="$PRUN $IMG true"
    [podman-net-none]="$PRUN --network none $IMG true"
  )
  HOT_NAMES=(ember runc podman podman-net-none)
  # runc needs a container id; `runc run` deletes the container on exit.
  hot_id() { if [ "$1" = runc ]; then echo "ember-bench-$2"; fi; }
  OK_NAMES=()
  for name in "${HOT_NAMES[@]}"; do
    # shellcheck disable=SC2086,SC2046
    if ${HOT_CMD[$name]} $(hot_id "$name" smoke) >"$RAW/hot-smoke-$name.out" 2>"$RAW/hot-smoke-$name.err" </dev/null; then
      OK_NAMES+=("$name")
    else
      HOT_FAIL[$name]=$(tail -c 600 "$RAW/hot-smoke-$name.err")
      log "  $name FAILED its smoke run: ${HOT_FAIL[$name]}"
    fi
  done
  # Primary measurement: our own loop, interleaved. Every iteration runs
  # each command once, in an order rotated every iteration, so slow phases
  # of a noisy machine hit all commands alike and ratios can be paired.
  n=${#OK_NAMES[@]}
  log "hot start: $n commands, $WARMUP warm-up + $HOT_RUNS timed iterations, interleaved"
  : >"$RAW/hot-loop.jsonl"
  for ((i = 1 - WARMUP; i <= HOT_RUNS; i++)); do
    for ((k = 0; k < n; k++)); do
      name=${OK_NAMES[$(((k + i + WARMUP) % n))]}
      rc=0
      # shellcheck disable=SC2086,SC2046
      timed /dev/null "$RAW/hot-last.err" ${HOT_CMD[$name]} $(hot_id "$name" "$i") </dev/null || rc=$?
      ((rc == 0)) || die "hot start: $name failed (exit $rc): $(tail -c 600 "$RAW/hot-last.err")"
      if ((i >= 1)); then
        echo "{\"iteration\":$i,\"position\":$((k + 1)),\"command\":\"$name\",\"ms\":$(jq -n "$DT_US/1000")}" >>"$RAW/hot-loop.jsonl"
      fi
    done
  done
  log "  loop p50: $(jq -rs 'group_by(.command) | map("\(.[0].command) \(map(.ms) | sort | .[length / 2 | floor] * 10 | round / 10) ms") | join(", ")' "$RAW/hot-loop.jsonl")"

  # Cross-check with hyperfine (-N: no shell), one block per command.
  if ((HYPERFINE)); then
    args=()
    for name in "${OK_NAMES[@]}"; do args+=(-n "$name" "${HOT_CMD[$name]} $(hot_id "$name" hf)"); done
    f=$RAW/hot-hyperfine.json
    if hyperfine -N --style basic --warmup "$WARMUP" --runs "$HOT_RUNS" --export-json "$f" "${args[@]}" \
      >"$RAW/hot-hyperfine.log" 2>&1; then
      HOT_JSON_FILES+=("$f")
      log "  hyperfine median: $(jq -r '[.results[] | "\(.command) \(.median * 1000 * 10 | round / 10) ms"] | join(", ")' "$f")"
    else
      log "  hyperfine failed (ignored, see $RAW/hot-hyperfine.log): $(tail -3 "$RAW/hot-hyperfine.log")"
    fi
  fi

  # Where ember's start time goes: 5 runs with --timings=json, untimed.
  for i in 1 2 3 4 5; do
    "$EMBER" --root "$ER" run --rm --timings=json "$IMG" true 2>"$RAW/timings-$i.err" >/dev/null </dev/null || true
    grep -E '^\{.*\}$' "$RAW/timings-$i.err" | tail -1 >>"$RAW/hot-timings.jsonl" || true
  done
fi

LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)

# -------------------------------------------------------------- results
ver() { "$@" 2>/dev/null | head -1 || echo unknown; }

sizes_json=$(for img in $IMAGES; do
  jq -nc --arg i "$img" --argjson c "${IMG_BYTES[$img]}" --arg u "${IMG_UNPACKED[$img]:-}" --arg f "${IMG_FILES[$img]:-}" \
    '{($i): {compressed_bytes:$c, unpacked_bytes:($u|tonumber? // null), unpacked_entries:($f|tonumber? // null)}}'
done | jq -sc 'add // {}')
hot_fail_json=$(for k in "${!HOT_FAIL[@]}"; do jq -nc --arg k "$k" --arg v "${HOT_FAIL[$k]}" '{($k):$v}'; done | jq -sc 'add // {}')

conditions=$(jq -n \
  --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --arg kernel "$(uname -r)" \
  --argjson nproc "$(nproc)" \
  --arg cpu "$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" \
  --argjson mem_gib "$(awk '/MemTotal/{printf "%.1f", $2/1048576}' /proc/meminfo)" \
  --arg fs "$(df -T "$WORK" | awk 'NR==2{print $2}')" --arg pull_fs "$PULL_FS" \
  --arg loadavg_start "$LOADAVG_START" --arg loadavg_end "$LOADAVG_END" \
  --argjson runs "$RUNS" --argjson hot_runs "$HOT_RUNS" --argjson warmup "$WARMUP" \
  --argjson dropped "$CACHES_DROPPED" --argjson drop_asked "$([ "$DROP_CACHES" = 1 ] && echo true || echo false)" \
  --arg git "$GIT_REV" --argjson dirty "$GIT_DIRTY" --arg ember_source "$EMBER_SOURCE" --arg ember_sha "$EMBER_SHA" \
  --arg ember "$(ver "$EMBER" --version)" --arg podman "$(ver podman --version)" --arg skopeo "$(ver skopeo --version)" \
  --arg umoci "$(ver umoci --version)" --arg runc "$(ver runc --version)" --arg hyperfine "$(ver hyperfine --version)" \
  --arg registry "$(ver docker-registry --version)" \
  --arg nofile "$(ulimit -Hn)" \
  '{date:$date, kernel:$kernel, nproc:$nproc, cpu:$cpu, mem_gib:$mem_gib, work_fs:$fs, pull_fs:$pull_fs,
    loadavg_start:$loadavg_start, loadavg_end:$loadavg_end,
    pull_runs:$runs, hot_runs:$hot_runs, hot_warmup:$warmup,
    page_cache_dropped:$dropped, drop_caches_requested:$drop_asked,
    registry:"docker-registry (CNCF distribution) on 127.0.0.1, filesystem storage on the same disk, plain HTTP",
    ember_git:$git, ember_crates_dirty:$dirty, ember_source:$ember_source, ember_binary_sha256_16:$ember_sha,
    versions:{ember:$ember, podman:$podman, skopeo:$skopeo, umoci:$umoci, runc:$runc, hyperfine:$hyperfine, registry:$registry},
    hard_nofile:$nofile}')

hot_all=$(if ((${#HOT_JSON_FILES[@]})); then jq -s '[.[].results[]]' "${HOT_JSON_FILES[@]}"; else echo '[]'; fi)

jq -n \
  --argjson conditions "$conditions" \
  --argjson sizes "$sizes_json" \
  --slurpfile pull "$RAW/pull.jsonl" \
  --argjson hot "$hot_all" \
  --slurpfile timings "$RAW/hot-timings.jsonl" \
  --slurpfile loop "$RAW/hot-loop.jsonl" \
  --argjson hotfail "$hot_fail_json" \
  --argjson skip_pull "$SKIP_PULL" --argjson skip_hot "$SKIP_HOT" '
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def pct(p): sort | if length == 0 then null else .[((length * p) | ceil) - 1] end;
  def r(n): if . == null then null else (. * pow(10; n) | round) / pow(10; n) end;
  ($pull | map(select(.ok))) as $okp
  | {
    conditions: $conditions,
    images: $sizes,
    pull: (if $skip_pull == 1 then null else
      [$sizes | keys_unsorted[] as $img
       | ($okp | map(select(.image == $img))) as $runs
       | ($runs | map(select(.tool == "ember")) | map(.seconds) | median) as $em
       | {image: $img,
          compressed_mb: ($sizes[$img].compressed_bytes / 1e6 | r(1)),
          tools: ([("ember", "ember-norecord", "podman", "skopeo+umoci", "floor") as $t
            | ($runs | map(select(.tool == $t))) as $tr
            | {key: $t, value: {
                runs: ($tr | length),
                failures: ($pull | map(select(.image == $img and .tool == $t and (.ok | not))) | length),
                median_s: ($tr | map(.seconds) | median | r(3)),
                min_s: ($tr | map(.seconds) | min | r(3)),
                max_s: ($tr | map(.seconds) | max | r(3)),
                mb_per_s: (if ($tr | length) > 0 then ($sizes[$img].compressed_bytes / 1e6 / ($tr | map(.seconds) | median) | r(1)) else null end),
                median_with_sync_s: ($tr | map(.seconds + .sync_after_s) | median | r(3)),
                all_s: ($tr | map(.seconds | r(4)))}}] | from_entries),
          ember_pull_json_median_run: ($runs | map(select(.tool == "ember" and .ember_pull_json)) | sort_by(.seconds) | if length > 0 then .[(length - 1) / 2 | floor].ember_pull_json else null end),
          floor_split_median_s: ($runs | map(select(.tool == "floor" and .parts)) | if length > 0 then {tar_x: (map(.parts.tar_x_s) | median | r(3)), gunzip: (map(.parts.gunzip_s) | median | r(3))} else null end),
          skopeo_umoci_split_median_s: ($runs | map(select(.tool == "skopeo+umoci" and .parts)) | if length > 0 then {skopeo: (map(.parts.skopeo_s) | median | r(3)), umoci: (map(.parts.umoci_s) | median | r(3))} else null end),
          ratios_of_medians: {
            podman_over_ember: (($runs | map(select(.tool == "podman")) | map(.seconds) | median) as $p | if $p and $em then $p / $em | r(2) else null end),
            skopeo_umoci_over_ember: (($runs | map(select(.tool == "skopeo+umoci")) | map(.seconds) | median) as $s | if $s and $em then $s / $em | r(2) else null end),
            ember_over_floor_tar_x: (($runs | map(select(.tool == "floor")) | map(.seconds) | median) as $f | if $f and $em then $em / $f | r(2) else null end),
            ember_over_ember_norecord: (($runs | map(select(.tool == "ember-norecord")) | map(.seconds) | median) as $n | if $n and $em then $em / $n | r(3) else null end)},
          paired_ratio_medians: {
            podman_over_ember: ([$runs | group_by(.round)[] | (map(select(.tool == "ember"))[0].seconds) as $e | (map(select(.tool == "podman"))[0].seconds) as $p | select($e and $p) | $p / $e] | median | r(2)),
            skopeo_umoci_over_ember: ([$runs | group_by(.round)[] | (map(select(.tool == "ember"))[0].seconds) as $e | (map(select(.tool == "skopeo+umoci"))[0].seconds) as $p | select($e and $p) | $p / $e] | median | r(2)),
            ember_over_ember_norecord: ([$runs | group_by(.round)[] | (map(select(.tool == "ember"))[0].seconds) as $e | (map(select(.tool == "ember-norecord"))[0].seconds) as $p | select($e and $p) | $e / $p] | median | r(3))}
         }] end),
    pull_runs_raw: $pull,
    hot: (if $skip_hot == 1 then null else
      def stats: {runs: length, p50_ms: (median | r(1)), p90_ms: (pct(0.9) | r(1)),
                  min_ms: (min | r(1)), max_ms: (max | r(1)), mean_ms: (add / length | r(1))};
      ([$loop | group_by(.command)[] | {key: .[0].command, value: (map(.ms) | stats + {all_ms: map(r(2))})}] | from_entries) as $h
      | ([$hot[] | {key: .command, value: (.times | map(. * 1000) | stats)}] | from_entries) as $hf
      | def paired(a; b): [$loop | group_by(.iteration)[]
            | (map(select(.command == a))[0].ms) as $a | (map(select(.command == b))[0].ms) as $b
            | select($a and $b) | $a / $b] | median | r(2);
      {method: "own loop, interleaved: each iteration runs every command once, order rotated each iteration; wall time from bash EPOCHREALTIME around fork+exec+wait",
       commands: $h,
       failed: $hotfail,
       ratios_of_p50: {
         ember_over_runc: (if $h.ember and $h.runc then $h.ember.p50_ms / $h.runc.p50_ms | r(2) else null end),
         podman_over_ember: (if $h.ember and $h.podman then $h.podman.p50_ms / $h.ember.p50_ms | r(2) else null end),
         podman_net_none_over_ember: (if $h.ember and $h["podman-net-none"] then $h["podman-net-none"].p50_ms / $h.ember.p50_ms | r(2) else null end)},
       paired_ratio_medians: {
         ember_over_runc: paired("ember"; "runc"),
         podman_over_ember: paired("podman"; "ember"),
         podman_net_none_over_ember: paired("podman-net-none"; "ember")},
       hyperfine: (if ($hf | length) > 0 then {method: "hyperfine -N, all runs of one command in a block", commands: $hf,
         ratios_of_p50: {
           ember_over_runc: (if $hf.ember and $hf.runc then $hf.ember.p50_ms / $hf.runc.p50_ms | r(2) else null end),
           podman_over_ember: (if $hf.ember and $hf.podman then $hf.podman.p50_ms / $hf.ember.p50_ms | r(2) else null end)}} else null end),
       loop_raw: $loop,
       hyperfine_raw: $hot,
       ember_timings_runs: $timings,
       ember_timings_median_run: ($timings | sort_by(.total_ms) | if length > 0 then .[(length - 1) / 2 | floor] else null end)}
      end)
  }' >"$OUT/latest.json"

# Markdown
J=$OUT/latest.json
f2() { if [ "$1" = null ] || [ -z "$1" ]; then echo "–"; else printf '%.2f' "$1"; fi; }
f1() { if [ "$1" = null ] || [ -z "$1" ]; then echo "–"; else printf '%.1f' "$1"; fi; }
{
  if ((SKIP_PULL == 0)); then
    echo "### Cold pull + unpack (image not on the node; fresh store every run)"
    echo
    echo "| image | compressed → unpacked | ember pull | podman pull | skopeo copy + umoci unpack | podman / ember | skopeo+umoci / ember | floor: tar -x · gunzip |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for img in $IMAGES; do
      q() { jq -r --arg i "$img" "(.pull[] | select(.image == \$i)) | $1" "$J"; }
      cell() {
        local t=$1 med mn mbs fails
        med=$(q ".tools[\"$t\"].median_s"); mn=$(q ".tools[\"$t\"].min_s"); mbs=$(q ".tools[\"$t\"].mb_per_s"); fails=$(q ".tools[\"$t\"].failures")
        if [ "$med" = null ]; then echo "failed"; else
          printf '%.2f s (min %.2f) · %s MB/s' "$med" "$mn" "$(f1 "$mbs")"
          [ "$fails" = 0 ] || printf ' (%s failed)' "$fails"
        fi
      }
      fl=$(q '.floor_split_median_s // empty | "\(.tar_x) s · \(.gunzip) s"')
      printf '| %s | %s MB → %s MB, %s entries | %s | %s | %s | %s× | %s× | %s |\n' "$img" "$(q .compressed_mb)" \
        "$(jq -r --arg i "$img" '.images[$i].unpacked_bytes // 0 | . / 1e6 | round' "$J")" "$(jq -r --arg i "$img" '.images[$i].unpacked_entries // "?"' "$J")" \
        "$(cell ember)" "$(cell podman)" "$(cell skopeo+umoci)" \
        "$(f2 "$(q .ratios_of_medians.podman_over_ember)")" "$(f2 "$(q .ratios_of_medians.skopeo_umoci_over_ember)")" "${fl:-–}"
    done
    echo
    echo "Median (and minimum) wall seconds over $RUNS run(s) per tool and image; MB/s is compressed MB (10^6 bytes) over the median."
    echo "Ratios are ratios of medians (target: podman / ember ≥ 2)."
    echo "Each run starts from an empty, already-initialised store (podman: overlay driver; skopeo: a new OCI layout + umoci bundle) on $(jq -r .conditions.pull_fs "$J"); nothing is deleted until $( ((TMPFS)) && echo "an image's runs are" || echo "all runs are") done. Tools run in an order rotated (and reversed) every round."
    echo "Floor: what the machine needs for the same bytes without any client, measured in the same rotation: GNU \`tar -x\` of the already-uncompressed layers (file creation and writes) and \`gzip -dc\` of the layers to /dev/null (decompression, one core); ember's pull overlaps the two and adds download and sha256."
    echo "Time to durable (tool + a \`sync\` right after it), median s:"
    for img in $IMAGES; do
      printf -- '%s: ember %s, podman %s, skopeo+umoci %s; ' "$img" \
        "$(f2 "$(jq -r --arg i "$img" '(.pull[] | select(.image == $i)).tools.ember.median_with_sync_s' "$J")")" \
        "$(f2 "$(jq -r --arg i "$img" '(.pull[] | select(.image == $i)).tools.podman.median_with_sync_s' "$J")")" \
        "$(f2 "$(jq -r --arg i "$img" '(.pull[] | select(.image == $i)).tools["skopeo+umoci"].median_with_sync_s' "$J")")"
    done | sed 's/; $/./'
    echo
    echo "What the tree record (for \`ember store verify\`) costs a cold pull: ember / ember --no-tree-record, ratio of medians (median of per-round ratios), budget 1.05:"
    for img in $IMAGES; do
      printf -- '%s: %s (%s); ' "$img" \
        "$(jq -r --arg i "$img" '(.pull[] | select(.image == $i)).ratios_of_medians.ember_over_ember_norecord // "–"' "$J")" \
        "$(jq -r --arg i "$img" '(.pull[] | select(.image == $i)).paired_ratio_medians.ember_over_ember_norecord // "–"' "$J")"
    done | sed 's/; $/./'
    echo
    echo "Where the time goes (median run): "
    for img in $IMAGES; do
      jq -r --arg i "$img" '(.pull[] | select(.image == $i)) | "- \($i): ember pull --json " +
        (.ember_pull_json_median_run // {} | . as $e | ["resolve", "fetch", "unpack", "commit", "total"] | map(select($e[. + "_ms"] != null) | "\(.) \($e[. + "_ms"] | round) ms") | join(", ")) +
        (if .skopeo_umoci_split_median_s then "; skopeo copy \(.skopeo_umoci_split_median_s.skopeo) s + umoci unpack \(.skopeo_umoci_split_median_s.umoci) s" else "" end)' "$J"
    done
    echo
  fi
  if ((SKIP_HOT == 0)); then
    echo "### Hot start: \`true\` in busybox, image already on the node"
    echo
    echo "| command | p50 | p90 | min | hyperfine p50 |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    for name in ember runc podman podman-net-none; do
      label=$(case $name in
        ember) echo '`ember run --rm`' ;;
        runc) echo 'bare `runc run` of a prepared bundle' ;;
        podman) echo '`podman run --rm`' ;;
        podman-net-none) echo '`podman run --rm --network none`' ;;
      esac)
      row=$(jq -r --arg n "$name" '.hot.commands[$n] // empty | "\(.p50_ms) \(.p90_ms) \(.min_ms)"' "$J")
      hf=$(jq -r --arg n "$name" '.hot.hyperfine.commands[$n].p50_ms // "null"' "$J")
      if [ -n "$row" ]; then
        read -r a b c <<<"$row"
        printf '| %s | %s ms | %s ms | %s ms | %s ms |\n' "$label" "$(f1 "$a")" "$(f1 "$b")" "$(f1 "$c")" "$(f1 "$hf")"
      else
        printf '| %s | failed | | | |\n' "$label"
      fi
    done
    echo
    printf 'ember / runc: **%s×** (target ≤ 1.3) · podman / ember: **%s×** (target ≥ 3) · podman --network none / ember: %s× (ratios of p50s; medians of per-iteration ratios: %s×, %s×, %s×)\n' \
      "$(f2 "$(jq -r .hot.ratios_of_p50.ember_over_runc "$J")")" "$(f2 "$(jq -r .hot.ratios_of_p50.podman_over_ember "$J")")" \
      "$(f2 "$(jq -r .hot.ratios_of_p50.podman_net_none_over_ember "$J")")" \
      "$(f2 "$(jq -r .hot.paired_ratio_medians.ember_over_runc "$J")")" "$(f2 "$(jq -r .hot.paired_ratio_medians.podman_over_ember "$J")")" \
      "$(f2 "$(jq -r .hot.paired_ratio_medians.podman_net_none_over_ember "$J")")"
    echo
    echo "$HOT_RUNS timed iterations after $WARMUP warm-up ones; each iteration runs every command once, the order rotated every iteration (wall time around fork, exec and wait, from bash). The last column is a separate \`hyperfine -N --warmup $WARMUP --runs $HOT_RUNS\` of the same commands, one after another."
    echo "Same busybox image for all. runc's bundle is \`umoci unpack\` output (config: no terminal, args [\"/bin/true\"], RLIMIT_NOFILE 1024); podman uses its default bridge network unless \`--network none\`."
    tj=$(jq -c '.hot.ember_timings_median_run' "$J")
    if [ "$tj" != null ]; then
      echo "\`ember run --timings=json\` (median of 5): $(jq -r 'to_entries | map(select(.key | endswith("_ms")) | select(.value != null) | "\(.key | sub("_ms$"; "")) \(.value * 10 | round / 10)") | join(", ")' <<<"$tj") ms."
    fi
    echo
  fi
  jq -r '.conditions | "Conditions: \(.date), Linux \(.kernel), \(.nproc) CPUs (\(.cpu)), \(.mem_gib) GiB, work dir on \(.work_fs); load average \(.loadavg_start) at start, \(.loadavg_end) at end. " +
    "Registry: \(.registry). Page cache \(if .page_cache_dropped then "dropped (sync; echo 3 > drop_caches) before every cold pull" else "not dropped (the registry serves its blobs from memory; `sync` before every run)" end). " +
    "\(.versions.ember) (\(.ember_source)); \(.versions.podman); \(.versions.skopeo); \(.versions.umoci); \(.versions.runc); \(.versions.hyperfine); \(.versions.registry)."' "$J"
} >"$OUT/latest.md"

log "wrote $OUT/latest.json and $OUT/latest.md"
cat "$OUT/latest.md"
