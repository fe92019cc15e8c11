#!/usr/bin/env bash
# The quickstart: on Debian bookworm as root, install what is needed, build
# lazybd, build a small image locally (busybox plus 96 MiB of application
# data), push it to a private docker-registry on 127.0.0.1, convert it to
# lazybd layers in the registry, mount it lazily, run its program in a
# chroot, and print what was fetched against the image size. Everything it
# starts (registry, mount, scratch dir) is stopped and removed on exit.
#
#   hack/quickstart.sh            # uses a scratch dir under /var/tmp
#   KEEP=1 hack/quickstart.sh     # keeps the scratch dir for a look around
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "quickstart: run as root (it mounts filesystems and sets up loop devices)" >&2
  exit 1
fi

hack/install-deps.sh
echo "== building lazybd"
cargo build --locked -p lazybd-blockdev --bins
LAZYBD="$PWD/target/debug/lazybd"

WORK=$(mktemp -d /var/tmp/lazybd-quickstart.XXXXXX)
REGISTRY_PID=
cleanup() {
  set +e
  [ -d "$WORK/mnt" ] && "$LAZYBD" umount --root "$WORK/state" "$WORK/mnt" >/dev/null 2>&1
  [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

echo "== starting a private registry on 127.0.0.1"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: 127.0.0.1:$PORT
EOF
docker-registry serve "$WORK/registry.yml" 2>"$WORK/registry.log" &
REGISTRY_PID=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null || { cat "$WORK/registry.log"; exit 1; }
REGISTRY=127.0.0.1:$PORT

echo "== building an image locally (busybox + application data)"
umoci init --layout "$WORK/image"
umoci new --image "$WORK/image:app"
umoci unpack --image "$WORK/image:app" "$WORK/bundle" >/dev/null
ROOTFS="$WORK/bundle/rootfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/app/data"
cp /bin/busybox "$ROOTFS/bin/busybox"
for tool in sh cat ls wc head sha256sum du; do ln -sf busybox "$ROOTFS/bin/$tool"; done
for i in $(seq 1 12); do
  head -c $((8 << 20)) /dev/urandom >"$ROOTFS/app/data/model-$i.bin"
done
cat >"$ROOTFS/app/run.sh" <<'EOF'
#!/bin/sh
echo "hello from a lazily mounted image"
echo "app data: $(ls /app/data | wc -l) files; reading one of them:"
head -c 1048576 /app/data/model-7.bin | sha256sum
EOF
chmod 755 "$ROOTFS/app/run.sh"
umoci repack --image "$WORK/image:app" "$WORK/bundle"
umoci config --image "$WORK/image:app" --config.entrypoint /app/run.sh
skopeo copy --quiet --dest-tls-verify=false "oci:$WORK/image:app" "docker://$REGISTRY/quickstart:app"

echo "== converting $REGISTRY/quickstart:app -> $REGISTRY/quickstart:lazybd"
"$LAZYBD" convert --plain-http --work-dir "$WORK" \
  "$REGISTRY/quickstart:app" "$REGISTRY/quickstart:lazybd"
"$LAZYBD" inspect --plain-http "$REGISTRY/quickstart:lazybd"

echo "== mounting it lazily and running /app/run.sh in it"
mkdir -p "$WORK/mnt"
"$LAZYBD" mount --plain-http --root "$WORK/state" "$REGISTRY/quickstart:lazybd" "$WORK/mnt"
chroot "$WORK/mnt" /app/run.sh

echo "== what was fetched"
"$LAZYBD" stats --root "$WORK/state" "$WORK/mnt"
FETCHED=$("$LAZYBD" stats --root "$WORK/state" --json "$WORK/mnt" |
  jq '[.stats.sources[] | select(.name == "registry") | .bytes] | add // 0')
SIZE=$("$LAZYBD" inspect --plain-http --json "$REGISTRY/quickstart:lazybd" | jq '[.[].blob_size] | add')
echo "fetched $FETCHED of $SIZE bytes ($((100 * FETCHED / SIZE))%) to run the program"
