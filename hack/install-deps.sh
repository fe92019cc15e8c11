#!/usr/bin/env bash
# Installs every system package lazybd's build, tests and benchmarks use, on
# Debian bookworm as root. Safe to run again: apt skips what is there.
set -euo pipefail

PACKAGES=(
  # build and lint
  build-essential pkg-config protobuf-compiler libfuse3-dev shellcheck
  # lazy block device: FUSE file -> loop -> EROFS, overlayfs
  fuse3 erofs-utils e2fsprogs util-linux kmod
  # images and registry for tests: built locally, served on 127.0.0.1
  docker-registry skopeo umoci busybox-static debootstrap jq curl python3
  # hack/validate-deploy.sh: kubernetes-validate in a venv, systemd-analyze
  python3-venv systemd
  # container runtime targets
  containerd runc
  # snapshotter conformance suite (Go harness over containerd's testsuite)
  golang-go golang-github-containerd-containerd-dev
  # networking tests and the eni plugin
  iproute2 iptables containernetworking-plugins
  # benchmarks
  fio hyperfine procps gnuplot-nox
)

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Kernel pieces: most kernels have them built in; modprobe is best effort and
# the checks below say what is really missing.
for m in fuse loop erofs overlay; do modprobe "$m" 2>/dev/null || true; done
for fs in fuse erofs overlay; do
  grep -qw "$fs" /proc/filesystems || { echo "install-deps: kernel lacks $fs" >&2; exit 1; }
done
[ -e /dev/loop-control ] || { echo "install-deps: no /dev/loop-control" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "install-deps: no /dev/fuse" >&2; exit 1; }
# The FUSE control filesystem: the failover tests count the requests that
# wait on a FUSE connection and abort connections there. A systemd boot
# mounts it; a bare VM or a container may not.
if ! mountpoint -q /sys/fs/fuse/connections; then
  mount -t fusectl fusectl /sys/fs/fuse/connections ||
    { echo "install-deps: cannot mount fusectl on /sys/fs/fuse/connections" >&2; exit 1; }
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
echo "install-deps: ok"
