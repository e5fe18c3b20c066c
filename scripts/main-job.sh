#!/usr/bin/env bash
# Lamina's main job from start to end, on a fresh Debian machine (run as root):
#
#   1. install what it needs: Debian packages, and Lamina in a venv (pip install .);
#   2. build a real image with scripts/build-test-images.sh (debootstrap + umoci),
#      or take the one already in the image cache;
#   3. import it into the default store (/var/lib/lamina, or $LAMINA_ROOT);
#   4. prepare and mount a container root filesystem on it;
#   5. run a command inside it with chroot, which writes a file;
#   6. show the snapshot tree and disk usage;
#   7. unmount and remove the container snapshot, also on failure or Ctrl-C.
#
# Usage: scripts/main-job.sh
# Environment:
#   LAMINA_IMAGE   image of the build script to use: debian (default) or busybox
#   LAMINA_VENV    where to create the venv (default /opt/lamina/venv)
#   LAMINA_ROOT    the store (default /var/lib/lamina)
#   LAMINA_IMAGES  image cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/lamina-images)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${LAMINA_IMAGE:-debian}
VENV=${LAMINA_VENV:-/opt/lamina/venv}
CACHE=${LAMINA_IMAGES:-${XDG_CACHE_HOME:-$HOME/.cache}/lamina-images}
KEY="main-job-$$"

step() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "main-job.sh: run as root (mounts, chroot, debootstrap)" >&2; exit 1; }

step "installing Debian packages"
packages=()
for tool in python3:python3 mount:mount chroot:coreutils; do
    command -v "${tool%%:*}" >/dev/null || packages+=("${tool#*:}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
echo "ok"

step "installing Lamina into $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "$REPO"
LAMINA=("$VENV/bin/lamina")
[ -n "${LAMINA_ROOT:-}" ] && LAMINA+=(--root "$LAMINA_ROOT")
"${LAMINA[@]}" --version

step "building the $IMAGE image (skipped when $CACHE has it)"
LAMINA_TEST_IMAGES=$IMAGE bash "$REPO/scripts/build-test-images.sh" "$CACHE"
ls -l "$CACHE/$IMAGE.oci.tar"

MNT=$(mktemp -d /tmp/lamina-main-job.XXXXXX)
cleanup() {
    local status=$?
    step "cleaning up"
    if mountpoint -q "$MNT"; then umount "$MNT" || umount -l "$MNT"; fi
    rmdir "$MNT" 2>/dev/null || true
    "${LAMINA[@]}" snapshots rm "$KEY" 2>/dev/null && echo "removed snapshot $KEY" || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "importing $IMAGE into the store"
"${LAMINA[@]}" images import "$CACHE/$IMAGE.oci.tar" --name "$IMAGE"
"${LAMINA[@]}" images ls

step "preparing the container root filesystem $KEY at $MNT"
"${LAMINA[@]}" rootfs prepare "$IMAGE" "$KEY" --mount "$MNT"

step "running a command in the container (chroot)"
chroot "$MNT" /bin/sh -c '
    if [ -r /etc/os-release ]; then . /etc/os-release; echo "inside: $PRETTY_NAME"; fi
    echo "written by main-job.sh" > /root/hello.txt
    ls -l /root/hello.txt
'

step "snapshot tree"
"${LAMINA[@]}" snapshots tree

step "disk usage"
"${LAMINA[@]}" snapshots usage
