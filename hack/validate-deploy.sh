#!/usr/bin/env bash
# Validates deploy/: Kubernetes manifests against the Kubernetes OpenAPI
# schemas (strict: unknown fields fail), the systemd units with
# systemd-analyze verify, the containerd drop-in through containerd's own
# config loader, the CNI conflists, and the snapshotter config files against
# the snapshotter itself (it refuses unknown keys). Prints each check; exits
# non-zero on the first failure. Run as root (the config check mounts FUSE);
# hack/test.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

K8S_VERSION=1.29.0
KUBERNETES_VALIDATE=1.31.0 # bundles the schemas of 1.29 (and others) offline
VENV=/var/tmp/lazybd-venv
PY=/usr/bin/python3 # not a pyenv shim: CI machines have Debian's python3 only

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
  echo "validate-deploy: FAIL: $*" >&2
  exit 1
}
check() { echo "-- $*"; }

# Binaries: the unit checks run them (--help) and the config check starts the
# snapshotter. A no-op when `cargo build --workspace --bins` ran already.
bin=$repo/target/debug
if [ ! -x "$bin/lazybd-snapshotter" ] || [ ! -x "$bin/lazybd-supernode" ]; then
  check "building lazybd-snapshotter and lazybd-supernode"
  cargo build -q -p lazybd-snapshotter -p lazybd-blockdev --bins --locked
fi

# --- (a) Kubernetes manifests ----------------------------------------------
if [ ! -x "$VENV/bin/kubernetes-validate" ] ||
  [ "$("$VENV/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p')" != "$KUBERNETES_VALIDATE" ]; then
  check "installing kubernetes-validate==$KUBERNETES_VALIDATE into $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE"
fi
manifests=()
for f in deploy/kubernetes/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
check "kubernetes-validate --strict -k $K8S_VERSION ${manifests[*]}"
"$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${manifests[@]}" ||
  fail "Kubernetes manifests do not validate"
# kustomization.yaml has no OpenAPI schema: check that it lists exactly the
# manifests above, and extract the ConfigMap's snapshotter.toml for below.
check "deploy/kubernetes/kustomization.yaml lists every manifest"
"$VENV/bin/python" - "$tmp" "${manifests[@]}" <<'EOF' || fail "kustomization.yaml or configmap.yaml"
import os, sys, yaml
tmp, files = sys.argv[1], sys.argv[2:]
k = yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))
listed = sorted(k["resources"])
want = sorted(os.path.basename(f) for f in files)
if listed != want:
    sys.exit(f"resources {listed} != files {want}")
cm = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))
open(os.path.join(tmp, "configmap-snapshotter.toml"), "w").write(cm["data"]["snapshotter.toml"])
EOF

# --- snapshotter config files: loaded by the snapshotter itself -------------
# Each file is started twice on private paths: as it is, and with its
# commented-out [p2p] and [cri_keychain] tables switched on, so that every
# key written in deploy/ is one the daemon knows (it exits on unknown keys).
privatize() { # SRC DST DIR [uncomment]
  "$PY" - "$@" <<'EOF'
import re, sys
src, dst, d = sys.argv[1:4]
uncomment = len(sys.argv) > 4
out, section, on = [], "", False
for line in open(src):
    s = line.rstrip("\n")
    if uncomment:
        m = re.match(r"^# (\[(p2p|p2p\.tls|cri_keychain)\])\s*$", s)
        if m:
            on, s = True, m.group(1)
        elif on and re.match(r"^# [a-z_]+ = ", s):
            s = s[2:]
        elif not s.startswith("#"):
            on = False
    m = re.match(r"^\[([a-z0-9_.]+)\]", s)
    if m:
        section = m.group(1)
    kv = re.match(r"^([a-z_]+) = ", s)
    if kv:
        key = (section + "." if section else "") + kv.group(1)
        repl = {
            "root": f'"{d}/root"', "address": f'"{d}/snapshotter.sock"',
            "control_address": f'"{d}/control.sock"', "metrics_address": '"127.0.0.1:0"',
            "p2p.listen": '"127.0.0.1:0"', "p2p.advertise": '"127.0.0.1:7070"',
            "p2p.cluster_token_file": f'"{d}/cluster-token"',
            "p2p.tls.cert": f'"{d}/tls.pem"', "p2p.tls.key": f'"{d}/tls.key"',
            "p2p.tls.ca": f'"{d}/tls.pem"',
            "cri_keychain.listen": f'"{d}/cri.sock"',
        }.get(key)
        if repl:
            s = f"{kv.group(1)} = {repl}"
    out.append(s)
open(dst, "w").write("\n".join(out) + "\n")
EOF
}
start_snapshotter() { # CONFIG DIR
  RUST_BACKTRACE=0 "$bin/lazybd-snapshotter" --config "$1" >"$2/log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 150); do
    [ -S "$2/snapshotter.sock" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [ ! -S "$2/snapshotter.sock" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    cat "$2/log" >&2
    return 1
  fi
  kill -TERM "$pid"
  wait "$pid" || { cat "$2/log" >&2; return 1; }
}
if [ "$(id -u)" = 0 ] && [ -e /dev/fuse ]; then
  n=0
  for cfg in deploy/systemd/snapshotter.toml "$tmp/configmap-snapshotter.toml"; do
    for variant in as-is with-p2p-and-cri-keychain; do
      n=$((n + 1))
      d=$tmp/snap$n
      mkdir -p "$d"
      echo token >"$d/cluster-token"
      # [p2p.tls]: a self-signed certificate, which is also its CA.
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=lazybd-validate -keyout "$d/tls.key" -out "$d/tls.pem" 2>/dev/null ||
        fail "openssl could not make a test certificate"
      if [ $variant = as-is ]; then privatize "$cfg" "$d/config.toml" "$d"; else privatize "$cfg" "$d/config.toml" "$d" 1; fi
      grep -q '^\[p2p\]' "$d/config.toml" || [ $variant = as-is ] || fail "$cfg: no [p2p] example to check"
      check "lazybd-snapshotter loads $(basename "$cfg") ($variant)"
      start_snapshotter "$d/config.toml" "$d" || fail "lazybd-snapshotter refused $cfg ($variant)"
    done
  done
else
  echo "-- SKIP: snapshotter config check (needs root and /dev/fuse)"
fi

# --- (b) systemd units -------------------------------------------------------
# Units are verified as installed, with /usr/local/bin pointing at the built
# binaries. systemd-analyze verify only warns (exit 0) about unknown keys and
# bad values, so any output at all is a failure.
mkdir -p "$tmp/units" "$tmp/bin"
for b in lazybd-snapshotter lazybd-supernode; do ln -s "$bin/$b" "$tmp/bin/$b"; done
for u in deploy/systemd/*.service; do
  sed "s#/usr/local/bin/#$tmp/bin/#g" "$u" >"$tmp/units/$(basename "$u")"
done
check "systemd-analyze verify deploy/systemd/*.service"
out=$(systemd-analyze verify "$tmp"/units/*.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
# The flags of every ExecStart (the supernode's with its default file) must
# exist: clap rejects an unknown flag before it handles --help.
check "ExecStart flags are the binaries' flags"
(
  # shellcheck disable=SC1091
  . deploy/systemd/lazybd-supernode.default
  for u in "$tmp"/units/*.service; do
    line=$(sed -n 's/^ExecStart=//p' "$u")
    line=${line//\$LAZYBD_SUPERNODE_ARGS/$LAZYBD_SUPERNODE_ARGS}
    # shellcheck disable=SC2086
    $line --help >/dev/null || fail "$(basename "$u"): ExecStart=$line"
  done
)
u=deploy/systemd/lazybd-snapshotter.service
check "$u: KillMode=process, no private mount namespace"
grep -qx 'KillMode=process' "$u" || fail "$u: needs KillMode=process"
grep -qx 'Before=containerd.service.*' "$u" || fail "$u: needs Before=containerd.service"
if grep -Eq '^(PrivateTmp|PrivateDevices|PrivateMounts|ProtectSystem|ProtectHome|ProtectKernel[A-Za-z]*|ProtectControlGroups|ProtectProc|ProtectClock|ProtectHostname|ReadOnlyPaths|ReadWritePaths|InaccessiblePaths|ExecPaths|NoExecPaths|TemporaryFileSystem|BindPaths|BindReadOnlyPaths|RootDirectory|RootImage|MountFlags|MountAPIVFS|PrivateNetwork|NetworkNamespacePath|DynamicUser)=' "$u"; then
  fail "$u: a directive that gives the snapshotter its own mount namespace (its mounts must be the host's)"
fi

# --- (c) containerd drop-in --------------------------------------------------
cat >"$tmp/config.toml" <<EOF
version = 2
imports = ["$repo/deploy/containerd/lazybd.toml"]
EOF
check "containerd config dump with imports = [deploy/containerd/lazybd.toml]"
containerd --config "$tmp/config.toml" config dump >"$tmp/dump" 2>"$tmp/dump.err" ||
  fail "containerd config dump: $(cat "$tmp/dump.err")"
for want in \
  '^ *\[proxy_plugins\.lazybd\]' \
  '^ *type = "snapshot"' \
  '^ *address = "/run/lazybd/snapshotter\.sock"' \
  '^ *snapshotter = "lazybd"' \
  '^ *disable_snapshot_annotations = false' \
  '^ *\[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes\.lazybd\]' \
  '^ *runtime_type = "io\.containerd\.lazybd\.v2"' \
  '^ *ConfigPath = "/etc/lazybd/shim\.toml"'; do
  grep -Eq "$want" "$tmp/dump" || fail "containerd config dump lacks $want"
done
echo "   proxy plugin lazybd, CRI snapshotter lazybd, runtime io.containerd.lazybd.v2: ok"

# --- (d) CNI conflists -------------------------------------------------------
for f in deploy/cni/*.conflist; do
  check "$f: JSON, cniVersion 1.0.0, every plugin type installed"
  jq -e '.cniVersion == "1.0.0" and (.name | type == "string") and (.plugins | length > 0)' "$f" >/dev/null ||
    fail "$f: not a cniVersion 1.0.0 conflist"
  for t in $(jq -r '.plugins[] | .type, (.ipam.type // empty)' "$f"); do
    if [ "$t" = eni ]; then
      [ -x "$bin/eni" ] || [ -x /opt/cni/bin/eni ] || echo "   (eni: not built yet; cargo build -p lazybd-eni)"
    elif [ ! -x "/usr/lib/cni/$t" ] && [ ! -x "/opt/cni/bin/$t" ]; then
      fail "$f: plugin $t is in neither /usr/lib/cni nor /opt/cni/bin"
    fi
  done
done

echo "validate-deploy: ok"
