"""An imported image's merged tree equals the one containerd 1.6 unpacks from the same archive.

containerd imports each archive with `ctr images import` into its
overlayfs snapshotter and mounts it with `ctr images mount`; Lamina
imports it into a fresh root and mounts it read-only. The comparison
covers paths, types, modes, owners, sizes, content hashes, link targets,
device numbers, hard-link groups, xattrs and the times of non-directories.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from containerd_fixture import Containerd, containerd  # noqa: F401 - the session fixture
from images import image_archive
from treecompare import assert_trees_equal, snapshot_tree

from lamina.drivers import open_snapshotter
from lamina.images import import_image, mount_image, unmount_image

# Both archives of an image carry the same name, and the containerd fixture
# finds the name of a re-imported image in index.json only: so each
# docker-archive comes first.
CASES = [(name, fmt) for name in ("busybox", "debian", "deep", "big") for fmt in ("docker", "oci")]


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_merged_tree_matches_containerd(
    containerd: Containerd,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    name: str,
    fmt: str,
) -> None:
    archive = image_archive(name, fmt)
    sn = open_snapshotter(tmp_path / "root")
    try:
        result = import_image(sn, archive, name=name)
        assert len(result.created) == len(result.image.diff_ids)
        target = tmp_path / "mnt"
        mount_image(sn, name, target)
        try:
            ours = snapshot_tree(target)
        finally:
            unmount_image(sn, target)
    finally:
        sn.close()

    theirs = containerd.image_tree(archive)
    assert len(theirs) > 10
    assert_trees_equal(theirs, ours, mtimes="non-dirs")
