# shellcheck shell=bash
# Shared by hack/quickstart.sh and hack/bench-coldstart.sh (sourced, not run):
# a private lazybd stack under one directory. Every daemon gets its own
# socket, root and log there, so nothing touches the host's containerd.
#
#   STACK     the directory (required)
#   BIN       where the lazybd binaries are (required)
#
# Layout: $STACK/<daemon>/ holds a daemon's config, log and pid file.

# The registry: Debian's docker-registry serving $1 (storage dir) on $2
# (HOST:PORT), optionally inside network namespace $3.
registry_up() {
  local storage=$1 addr=$2 netns=${3:-}
  local dir=$STACK/registry
  mkdir -p "$dir" "$storage"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $storage
  delete:
    enabled: true
http:
  addr: $addr
EOF
  if [ -n "$netns" ]; then
    ip netns exec "$netns" docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  else
    docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  fi
  echo $! >"$dir/pid"
  wait_until 10 "registry on $addr" curl -fsS -o /dev/null "http://$addr/v2/" ||
    { cat "$dir/log" >&2; return 1; }
}

# containerd with its own root, state and socket, CRI off, the lazybd
# snapshotter as proxy plugin `lazybd`, and $BIN on its PATH so that
# `--runtime io.containerd.lazybd.v2` finds containerd-shim-lazybd-v2. $1 is
# extra TOML appended to its config (e.g. stargz_proxy_config); $2 its
# directory (default $STACK/containerd, the one `ctr_` talks to).
# shellcheck disable=SC2120 # $1 and $2 are optional
containerd_up() {
  local extra=${1:-} dir=${2:-$STACK/containerd}
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[proxy_plugins.lazybd]
  type = "snapshot"
  address = "$STACK/snapshotter/snapshotter.sock"
$extra
EOF
  PATH="$BIN:$PATH" LAZYBD_CONTROL_SOCKET="$STACK/snapshotter/control.sock" \
    containerd --config "$dir/config.toml" >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until 30 containerd ctr --address "$dir/containerd.sock" version ||
    { tail -20 "$dir/log" >&2; return 1; }
}

# lazybd-snapshotter on root $STACK/snapshotter/root; $1 is extra TOML
# (tables such as [p2p]) appended to its config; SNAPSHOTTER_CONFIG, if set,
# is top-level lines (before any table).
snapshotter_up() {
  local extra=${1:-} dir=$STACK/snapshotter
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<EOF
root = "$dir/root"
address = "$dir/snapshotter.sock"
control_address = "$dir/control.sock"
metrics_address = "$SNAPSHOTTER_METRICS"
${SNAPSHOTTER_CONFIG:-}

[registry]
plain_http = ["$REGISTRY"]

$extra
EOF
  "$BIN/lazybd-snapshotter" --config "$dir/config.toml" >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until 30 lazybd-snapshotter curl -fsS -o /dev/null "http://$SNAPSHOTTER_METRICS/metrics" ||
    { tail -20 "$dir/log" >&2; return 1; }
}

# stargz-snapshotter's daemon, $STARGZ_BIN (containerd-stargz-grpc, built by
# ../shared/anchors/stargz/build.sh), on root $STACK/stargz/root, with
# Prometheus metrics on $STARGZ_METRICS, fetching from $REGISTRY over plain
# HTTP; upstream defaults otherwise (prefetch to the landmark, background
# fetch). Start it before containerd: containerd remembers a failed dial to a
# proxy plugin for a moment.
stargz_up() {
  local dir=$STACK/stargz
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<EOF
metrics_address = "$STARGZ_METRICS"

[[resolver.host."$REGISTRY".mirrors]]
host = "$REGISTRY"
insecure = true
EOF
  "$STARGZ_BIN" -address "$dir/stargz.sock" -root "$dir/root" -config "$dir/config.toml" \
    >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until 30 containerd-stargz-grpc curl -fsS -o /dev/null "http://$STARGZ_METRICS/metrics" ||
    { tail -20 "$dir/log" >&2; return 1; }
}

# containerd_up's extra config for stargz_up's daemon: proxy plugin `stargz`.
stargz_proxy_config() {
  cat <<EOF
[proxy_plugins.stargz]
  type = "snapshot"
  address = "$STACK/stargz/stargz.sock"
EOF
}

# lazybd-supernode for $REGISTRY on $1 (HOST:PORT); extra flags follow.
supernode_up() {
  local addr=$1 dir=$STACK/supernode
  shift
  mkdir -p "$dir"
  "$BIN/lazybd-supernode" --listen "$addr" --registry "$REGISTRY" --plain-http \
    --cache-dir "$dir/cache" "$@" >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  wait_until 30 lazybd-supernode curl -fsS -o /dev/null "http://$addr/healthz" ||
    { tail -20 "$dir/log" >&2; return 1; }
}

# Stops daemon $1 (a directory name under $STACK): SIGTERM, then SIGKILL
# after 15 s.
daemon_down() {
  local pidfile=$STACK/$1/pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

daemon_running() {
  [ -f "$STACK/$1/pid" ] && kill -0 "$(cat "$STACK/$1/pid")" 2>/dev/null
}

# Tasks, containers and images of namespace $1 go, then containerd and the
# snapshotters (lazybd's, and stargz's if it runs) stop, then whatever they
# left mounted in their directories (stargz's FUSE layers included).
containerd_and_snapshotter_down() {
  local ns=$1
  if daemon_running containerd; then
    for id in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
      ctr_ -n "$ns" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      ctr_ -n "$ns" tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
      ctr_ -n "$ns" containers rm "$id" >/dev/null 2>&1 || true
    done
    for ref in $(ctr_ -n "$ns" images ls -q 2>/dev/null); do
      ctr_ -n "$ns" images rm --sync "$ref" >/dev/null 2>&1 || true
    done
  fi
  daemon_down containerd
  daemon_down snapshotter
  daemon_down stargz
  unmount_under "$STACK/containerd"
  unmount_under "$STACK/snapshotter"
  unmount_under "$STACK/stargz"
}

# Unmounts everything mounted below $1, deepest first.
unmount_under() {
  { findmnt -rn -o TARGET | grep "^$1/" || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}

ctr_() {
  ctr --address "$STACK/containerd/containerd.sock" "$@"
}

# wait_until SECS WHAT CMD...: runs CMD every 0.1 s until it succeeds; after
# SECS says what it waited for and fails.
wait_until() {
  local secs=$1 what=$2
  shift 2
  for _ in $(seq $((secs * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "gave up waiting ${secs}s for $what" >&2
  return 1
}

# Sum of the snapshotter's lazybd_source_bytes_total over all sources.
snapshotter_fetched_bytes() {
  curl -fsS "http://$SNAPSHOTTER_METRICS/metrics" |
    awk '/^lazybd_source_bytes_total/ { s += $NF } END { printf "%d\n", s }'
}

# Sets variable $1 to the microseconds since the epoch, from bash's
# EPOCHREALTIME: no fork, so a clock read inside a measured window does not
# add the start of a `date` (cold after a cache drop) to what it measures.
now_us() {
  printf -v "$1" '%s' "${EPOCHREALTIME/[.,]/}"
}

# Prints the milliseconds from its call to the first line "$@" writes to
# stdout, the output of the command in $BYTES_NOW (if set) at that moment,
# and the line. Returns once "$@" has exited.
time_to_first_line() {
  local t0 t1 line bytes=-
  now_us t0
  "$@" | {
    IFS= read -r line || { echo "no output from $*" >&2; exit 1; }
    now_us t1
    [ -n "${BYTES_NOW:-}" ] && bytes=$($BYTES_NOW)
    echo "$(((t1 - t0) / 1000)) $bytes $line"
    cat >/dev/null
  }
}
