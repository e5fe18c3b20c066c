#!/usr/bin/env bash
# Run Lamina's whole test suite on a Debian machine, as root: install the
# Debian packages and Python packages it needs, check style and types, build
# the test images (cached outside the repository), then run pytest.
#
# Environment:
#   LAMINA_VENV        virtual environment to use (default: .venv in the repo)
#   LAMINA_IMAGES_DIR  test image cache (default: ~/.cache/lamina-images)
#   PYTEST_ARGS        extra pytest arguments, e.g. "-k conformance -x"
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf '[test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "run as root: the tests mount overlay and bind filesystems and run containerd" >&2
    exit 1
fi

# Debian packages: containerd and runc for the end-to-end tests and the
# reference trees, umoci/skopeo/podman/debootstrap to build real test images,
# attr and libcap2-bin for xattrs and file capabilities in test layers, gcc
# for the setuid program of the mount option tests.
packages=(python3-venv python3-dev containerd runc umoci skopeo podman debootstrap
          busybox-static attr libcap2-bin tar gzip zstd hyperfine gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

VENV=${LAMINA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi
log "installing lamina and its test tools"
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'

log "ruff"
"$VENV/bin/ruff" check src tests benchmarks
log "mypy --strict"
"$VENV/bin/mypy" --strict

log "test images"
bash scripts/build-test-images.sh

log "pytest"
basetemp=$(mktemp -d /tmp/lamina-tests.XXXXXX)
remove_basetemp() {
    # Never delete through a mount a failed test may have left behind.
    if grep -q " $basetemp/" /proc/self/mounts; then
        log "mounts are left under $basetemp; not removing it"
    else
        rm -rf "$basetemp"
    fi
}
trap remove_basetemp EXIT
# shellcheck disable=SC2086
"$VENV/bin/pytest" --basetemp "$basetemp/t" -p no:cacheprovider ${PYTEST_ARGS:-} tests
