#!/usr/bin/env bash
# Build the container images Lamina's tests import, with real tools.
#
# Usage: scripts/build-test-images.sh [OUT_DIR]
#   OUT_DIR: default ${XDG_CACHE_HOME:-$HOME/.cache}/lamina-images (outside the repository)
#
# For each image NAME it writes OUT_DIR/NAME.oci.tar (an oci-archive, gzip
# layers) and OUT_DIR/NAME.docker.tar (a docker-archive, as `docker save`
# writes it). An image whose two archives exist is skipped; delete them to
# rebuild it.
#
#   busybox  one layer: Debian's static busybox and its applet symlinks,
#            built with umoci
#   debian   four layers on a debootstrap --variant=minbase bookworm base,
#            built with umoci: deletions (whiteouts), a deleted and re-created
#            directory, hard links inside a layer and to a lower file,
#            symlinks, a fifo, a character device, setuid and setgid files,
#            user.* xattrs, a file capability, UTF-8 and long names, big ids;
#            the last layer is a tar written by GNU tar with an explicit
#            opaque-directory marker and whiteouts (umoci raw add-layer)
#   deep     busybox plus many small layers made with umoci repack (150 layers
#            in all, LAMINA_DEEP_LAYERS changes it): new files, changed and
#            deleted files of lower layers, a deleted directory, hard links
#   big      the debian image plus three layers of apt-get install
#            --no-install-recommends, each without apt's cache and lists:
#            python3, python3-pip, python3-venv and python3-dev, then git and
#            make, then the Boost 1.81 headers (about 600 MB in 30,000 files
#            in all). It is built only when LAMINA_TEST_IMAGES names it, and
#            it builds debian first when that is missing
#
# Needs root (debootstrap, mknod, chown). Missing Debian packages are
# installed with apt-get unless LAMINA_NO_APT=1.
# Environment:
#   LAMINA_TEST_IMAGES    images to build (default "busybox debian deep";
#                         big is built only when named here)
#   LAMINA_DEEP_LAYERS    layer count of the deep image (default 150)
#   LAMINA_DEBIAN_MIRROR  debootstrap mirror (default: this host's first apt
#                         source, else debootstrap's own default)
set -euo pipefail

OUT=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/lamina-images}
IMAGES=${LAMINA_TEST_IMAGES:-busybox debian deep}
DEEP_LAYERS=${LAMINA_DEEP_LAYERS:-150}

say() { printf 'build-test-images: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root: debootstrap, mknod and chown need it"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# One build at a time per folder; a second caller waits for the first.
exec 8>"$OUT/.build-test-images.lock"
flock 8

# ------------------------------------------------------------------ packages
missing=()
for tool in umoci:umoci skopeo:skopeo debootstrap:debootstrap setcap:libcap2-bin \
    setfattr:attr tar:tar; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
dpkg-query -W -f '${db:Status-Status}' busybox-static 2>/dev/null | grep -qx installed \
    || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
    [ "${LAMINA_NO_APT:-0}" = 1 ] && fail "missing Debian packages: ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

SCRATCH=$(mktemp -d "$OUT/.scratch.XXXXXX")
# Mount points made under $SCRATCH. They are unmounted, last first, before
# the scratch folder is removed, so that rm never walks into a mount.
MOUNTS=()
unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" || return 1
        unset 'MOUNTS[i]'
    done
}
cleanup() {
    if unmount_all; then
        rm -rf "$SCRATCH"
    else
        say "error: could not unmount ${MOUNTS[*]}, so $SCRATCH is left in place"
    fi
}
trap cleanup EXIT

is_built() { [ -s "$OUT/$1.oci.tar" ] && [ -s "$OUT/$1.docker.tar" ]; }

# Write both archives of the layout's "latest" tag, each renamed into place
# only when complete.
export_archives() {
    local name=$1 layout=$2 ref="localhost/lamina-test/$1:latest"
    rm -f "$OUT/.$name.oci.tar" "$OUT/.$name.docker.tar"
    skopeo copy -q "oci:$layout:latest" "oci-archive:$OUT/.$name.oci.tar:$ref"
    skopeo copy -q "oci:$layout:latest" "docker-archive:$OUT/.$name.docker.tar:$ref"
    mv "$OUT/.$name.oci.tar" "$OUT/$name.oci.tar"
    mv "$OUT/.$name.docker.tar" "$OUT/$name.docker.tar"
}

# Commit the bundle's rootfs changes as a new layer of the layout.
repack() {
    umoci repack --refresh-bundle --image "$1:latest" --history.created_by "$3" "$2"
}

# ------------------------------------------------------------------ busybox
busybox_layout() {
    local layout=$1 bundle=$SCRATCH/busybox-bundle root
    umoci init --layout "$layout"
    umoci new --image "$layout:latest"
    umoci unpack --image "$layout:latest" "$bundle"
    root=$bundle/rootfs
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/log,proc,sys,dev}
    chmod 1777 "$root/tmp"
    chmod 700 "$root/root"
    cp /bin/busybox "$root/bin/busybox"
    # busybox --install writes one symlink per applet into the tree it runs in.
    chroot "$root" /bin/busybox --install -s
    echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
    echo 'root:x:0:' > "$root/etc/group"
    repack "$layout" "$bundle" "busybox-static with applet symlinks"
    umoci config --image "$layout:latest" --config.cmd /bin/sh \
        --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin
    umoci gc --layout "$layout"
    rm -rf "$bundle"
}

build_busybox() {
    busybox_layout "$SCRATCH/busybox"
    export_archives busybox "$SCRATCH/busybox"
}

# ------------------------------------------------------------------ deep
build_deep() {
    local layout=$SCRATCH/deep bundle=$SCRATCH/deep-bundle root i n
    busybox_layout "$layout"
    umoci unpack --image "$layout:latest" "$bundle"
    root=$bundle/rootfs
    mkdir -p "$root/data"
    for ((i = 2; i <= DEEP_LAYERS; i++)); do
        n=$(printf '%03d' "$i")
        echo "layer $n" > "$root/data/$n"
        # every fifth layer changes a file of a lower layer, every seventh deletes one
        if ((i % 5 == 0)); then echo "$n" >> "$root/etc/passwd.log"; fi
        if ((i % 7 == 0)); then rm -f "$root/data/$(printf '%03d' $((i - 3)))"; fi
        case $i in
            10) mkdir -p "$root/opt/gone/sub"; echo x > "$root/opt/gone/sub/file" ;;
            20) rm -rf "$root/opt/gone" ;;
            30) ln "$root/data/030" "$root/data/030-link" ;;
            40) chmod 600 "$root/data/030" ;;
        esac
        repack "$layout" "$bundle" "deep layer $n"
    done
    umoci gc --layout "$layout"
    export_archives deep "$layout"
}

# ------------------------------------------------------------------ debian
host_mirror() {
    if [ -n "${LAMINA_DEBIAN_MIRROR:-}" ]; then
        echo "$LAMINA_DEBIAN_MIRROR"
    elif [ -r /etc/apt/sources.list.d/debian.sources ]; then
        sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources | head -n 1
    elif [ -r /etc/apt/sources.list ]; then
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list
    fi
}

# The fourth layer, written directly as a tar: an opaque marker makes
# /etc/apt show only this layer's content, a whiteout removes a lower file,
# and a hard link names a file of a lower layer.
write_opaque_layer() {
    local dir=$SCRATCH/layer4 tarball=$1
    mkdir -p "$dir/etc/apt" "$dir/usr/bin" "$dir/srv/lamina"
    echo 'APT::Install-Recommends "false";' > "$dir/etc/apt/apt.conf"
    touch "$dir/etc/apt/.wh..wh..opq"
    touch "$dir/usr/bin/.wh.tac"
    echo 'added by the fourth layer' > "$dir/srv/lamina/notes"
    cp -p /bin/busybox "$dir/usr/bin/busybox-copy"
    # GNU tar stores the second name of a hard-linked pair as a link entry.
    ln "$dir/usr/bin/busybox-copy" "$dir/srv/lamina/busybox-link"
    tar --create --file "$tarball" --directory "$dir" --numeric-owner --sort=name \
        --format=posix --xattrs etc usr srv
}

build_debian() {
    local layout=$SCRATCH/debian bundle=$SCRATCH/debian-bundle root mirror
    umoci init --layout "$layout"
    umoci new --image "$layout:latest"
    umoci unpack --image "$layout:latest" "$bundle"
    root=$bundle/rootfs
    mirror=$(host_mirror)

    say "debootstrap --variant=minbase bookworm${mirror:+ from $mirror}"
    debootstrap --variant=minbase bookworm "$root" ${mirror:+"$mirror"} > "$SCRATCH/debootstrap.log" 2>&1 \
        || { tail -20 "$SCRATCH/debootstrap.log" >&2; fail "debootstrap failed"; }
    # A base image carries no package cache, apt lists or host identity.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_* "$root"/var/log/*.log
    find "$root/dev" "$root/tmp" "$root/run" -mindepth 1 -delete
    rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
    repack "$layout" "$bundle" "debootstrap --variant=minbase bookworm"

    # Layer 2: deletions and a directory deleted and made again.
    rm -rf "$root/usr/share/man" "$root/usr/share/info"
    rm -f "$root/usr/bin/yes" "$root/etc/issue.net"
    rm -rf "$root/usr/share/doc"
    mkdir "$root/usr/share/doc"
    echo 'documentation removed' > "$root/usr/share/doc/README"
    repack "$layout" "$bundle" "remove documentation, re-create /usr/share/doc"

    # Layer 3: special files.
    local s=$root/srv/special long
    mkdir -p "$s/dir"
    cp "$root/bin/true" "$s/suid"; chmod 4755 "$s/suid"
    cp "$root/bin/true" "$s/sgid"; chmod 2755 "$s/sgid"
    cp "$root/bin/true" "$s/cap"; setcap cap_net_raw+ep "$s/cap"
    echo data > "$s/xattr"; setfattr -n user.lamina.colour -v blue "$s/xattr"
    echo one > "$s/link-a"; ln "$s/link-a" "$s/link-b"; ln "$s/link-a" "$s/dir/link-c"
    ln "$root/bin/cat" "$s/link-to-lower-cat"
    ln -s /bin/true "$s/absolute-symlink"
    ln -s ../special/link-a "$s/relative-symlink"
    ln -s missing-target "$s/dangling-symlink"
    mkfifo "$s/fifo"
    mknod "$s/null" c 1 3
    mkdir "$s/sticky"; chmod 1777 "$s/sticky"
    echo utf8 > "$s/$(printf 'gr\303\274\303\237e-\346\227\245\346\234\254')"
    long=$(printf 'n%.0s' $(seq 1 150))
    echo long > "$s/$long"
    echo ids > "$s/big-ids"; chown 2000000:2000001 "$s/big-ids"
    touch -d '2001-02-03 04:05:06' "$s/old"
    repack "$layout" "$bundle" "special files"

    # Layer 4: explicit opaque directory, whiteout and hard links (GNU tar).
    write_opaque_layer "$SCRATCH/layer4.tar"
    umoci raw add-layer --image "$layout:latest" --history.created_by "opaque /etc/apt" \
        "$SCRATCH/layer4.tar"

    umoci config --image "$layout:latest" --config.cmd /bin/bash \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    umoci gc --layout "$layout"
    export_archives debian "$layout"
}

# ------------------------------------------------------------------ big
# Mount what apt and the maintainer scripts need in the chroot: /proc, and a
# small /dev on a tmpfs because the debian image ships an empty /dev. A tmpfs
# with its own device nodes, unlike a bind mount of the host's /dev, cannot
# expose host nodes to the cleanup's rm.
mount_chroot() {
    local root=$1 node dev major minor
    mount -t proc proc "$root/proc"
    MOUNTS+=("$root/proc")
    mount -t tmpfs -o mode=755,size=1m tmpfs "$root/dev"
    MOUNTS+=("$root/dev")
    for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
        IFS=: read -r dev major minor <<< "$node"
        mknod -m 666 "$root/dev/$dev" c "$major" "$minor"
    done
    cp /etc/resolv.conf "$root/etc/resolv.conf"
}

# Undo mount_chroot, so that repack commits only the image's own files.
unmount_chroot() {
    unmount_all || fail "could not unmount ${MOUNTS[*]}"
    rm -f "$1/etc/resolv.conf"
}

# Install the packages in the bundle's rootfs and commit them as one layer.
# The layer leaves out apt's package cache and lists, as Dockerfiles usually do.
apt_layer() {
    local layout=$1 bundle=$2 root=$2/rootfs
    shift 2
    say "big: apt-get install $*"
    mount_chroot "$root"
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive /bin/sh -ec '
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends "$@"
            apt-get clean
            rm -rf /var/lib/apt/lists/*' apt-layer "$@" > "$SCRATCH/apt.log" 2>&1 \
        || { unmount_chroot "$root"; tail -20 "$SCRATCH/apt.log" >&2; fail "apt-get install $* failed"; }
    unmount_chroot "$root"
    repack "$layout" "$bundle" "apt-get install --no-install-recommends $*"
}

build_big() {
    local layout=$SCRATCH/big bundle=$SCRATCH/big-bundle root mirror
    is_built debian || build_debian
    skopeo copy -q "oci-archive:$OUT/debian.oci.tar" "oci:$layout:latest"
    umoci unpack --image "$layout:latest" "$bundle"
    root=$bundle/rootfs
    mirror=$(host_mirror)

    # The debian image's opaque /etc/apt hides the sources that debootstrap
    # wrote, so the first layer names them again.
    mkdir -p "$root/etc/apt/sources.list.d"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: %s\n' \
        "${mirror:-http://deb.debian.org/debian}" /usr/share/keyrings/debian-archive-keyring.gpg \
        > "$root/etc/apt/sources.list.d/debian.sources"
    apt_layer "$layout" "$bundle" python3 python3-pip python3-venv python3-dev
    apt_layer "$layout" "$bundle" git make
    apt_layer "$layout" "$bundle" libboost1.81-dev

    umoci gc --layout "$layout"
    export_archives big "$layout"
}

for name in $IMAGES; do
    case $name in
        busybox | debian | deep | big) ;;
        *) fail "unknown image $name: this script builds busybox, debian, deep and big" ;;
    esac
    if is_built "$name"; then
        say "$name: $OUT/$name.oci.tar and $name.docker.tar exist, skipping"
        continue
    fi
    say "$name: building"
    "build_$name"
    say "$name: written to $OUT"
done
