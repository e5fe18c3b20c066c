"""The layers of the reference images give the tree containerd 1.6 unpacks, on both apply paths.

containerd imports each archive with its overlayfs snapshotter and mounts
the image; Lamina applies the same layer blobs (a) in order into one
directory and (b) each into its own upper directory over the previous
ones, mounted as overlayfs. The trees must match in paths, types, modes,
owners, sizes, content hashes, link targets, device numbers, hard-link
groups, xattrs and the times of everything but directories (containerd
and Lamina both give implicit directories the current time).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from containerd_fixture import IMAGES_DIR, Containerd, containerd, image_layers
from hostile_layers import LayerBuilder, apply_generic, apply_overlay_stack, merged_view
from treecompare import assert_trees_equal, snapshot_tree

from lamina import mount as mounting
from lamina.archive import apply_layer_to_upper
from lamina.snapshots.types import Mount

__all__ = ["containerd"]

IMAGES = ["busybox", "debian", "deep"]


def _archive(image: str) -> Path:
    path = IMAGES_DIR / f"{image}.oci.tar"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the reference images first")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES)
def test_generic_path_matches_containerd(
    image: str, containerd: Containerd, tmp_path: Path
) -> None:
    archive = _archive(image)
    expected = containerd.image_tree(archive)
    layers = image_layers(archive, tmp_path / "layers")
    target = tmp_path / "rootfs"
    apply_generic(target, [p.read_bytes() for p in layers])
    assert_trees_equal(expected, snapshot_tree(target), mtimes="non-dirs")


@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES)
def test_overlay_stack_matches_containerd(
    image: str, containerd: Containerd, tmp_path: Path
) -> None:
    archive = _archive(image)
    expected = containerd.image_tree(archive)
    layers = image_layers(archive, tmp_path / "layers")
    uppers: list[Path] = []
    for i, layer in enumerate(layers):
        upper = tmp_path / "snapshots" / str(i)
        upper.mkdir(parents=True)
        with open(layer, "rb") as blob:
            apply_layer_to_upper(blob, upper, list(reversed(uppers)), layer=layer.name)
        uppers.append(upper)

    if len(uppers) == 1:
        actual = snapshot_tree(uppers[0])
    else:
        lowerdir = ":".join(os.fspath(p) for p in reversed(uppers))
        with mounting.temporary_mount(
            [Mount("overlay", "overlay", (f"lowerdir={lowerdir}",))], parent_dir=tmp_path
        ) as view:
            actual = snapshot_tree(view)
    assert_trees_equal(expected, actual, mtimes="non-dirs")


def _docker_archive(path: Path, name: str, layers: list[bytes]) -> Path:
    """Write a docker-archive image of LAYERS (uncompressed tars) to PATH."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        [
            {
                "Config": "config.json",
                "RepoTags": [name],
                "Layers": [f"{i}/layer.tar" for i in range(len(layers))],
            }
        ]
    ).encode()
    with tarfile.open(path, "w") as archive:
        for member, data in [("config.json", config), ("manifest.json", manifest)] + [
            (f"{i}/layer.tar", layer) for i, layer in enumerate(layers)
        ]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.slow
def test_same_layer_entries_survive_whiteouts_unlike_containerd(
    containerd: Containerd, tmp_path: Path
) -> None:
    """containerd 1.6 deletes entries of the layer that carries the whiteout; Lamina keeps them."""
    base = LayerBuilder().dir("d").file("d/old", b"old").dir("e").file("e/old", b"old")
    top = LayerBuilder().file("d/new", b"new").whiteout("d").file("e/x/y", b"y").opaque("e")
    layers = [base.tar(), top.tar()]
    archive = _docker_archive(tmp_path / "image.tar", "localhost/lamina/whiteouts:1", layers)

    ours = tmp_path / "ours"
    apply_generic(ours, layers)
    uppers = apply_overlay_stack(tmp_path / "stack", layers)
    # The OCI image spec: a whiteout hides only lower layers' content.
    assert (ours / "d/new").read_bytes() == b"new"
    assert (ours / "e/x/y").read_bytes() == b"y"
    assert not (ours / "d/old").exists()
    assert not (ours / "e/old").exists()
    with merged_view(uppers, tmp_path / "merged") as view:
        assert_trees_equal(ours, view, mtimes="non-dirs")

    # containerd's generic applier (native snapshotter) removes d with d/new,
    # and the implicit e/x with e/x/y.
    theirs = containerd.image_tree(archive, snapshotter="native")
    assert "d" not in theirs
    assert "e/x" not in theirs
    assert "e/old" not in theirs
    # Its overlayfs applier fails: mknod of the whiteout d finds d/ of the same layer.
    imported = containerd.run_ctr("images", "import", "--snapshotter", "overlayfs", str(archive))
    assert imported.returncode != 0
    assert "file exists" in imported.stderr
