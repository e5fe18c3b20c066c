"""Importing real image archives: formats, parallel unpack, reuse, records, platforms, races."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from images import extract_archive, image_archive
from treecompare import EntryRecord, assert_trees_equal, snapshot_tree

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import FailedPreconditionError
from lamina.images import (
    Platform,
    get_image,
    import_image,
    inspect_image,
    list_images,
    mount_image,
    prepare_rootfs,
    prune_images,
    remove_image,
    unmount_image,
)
from lamina.images.digest import chain_ids
from lamina.snapshots.types import Kind

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(lamina_root: Path) -> Iterator[LayerSnapshotter]:
    sn = open_snapshotter(lamina_root)
    yield sn
    sn.close()


def merged_tree(sn: LayerSnapshotter, image: str, target: Path) -> dict[str, EntryRecord]:
    """Return the tree of IMAGE as a read-only mount shows it."""
    mount_image(sn, image, target)
    try:
        return snapshot_tree(target)
    finally:
        unmount_image(sn, target)


def without_whiteout_times(tree: dict[str, EntryRecord]) -> dict[str, EntryRecord]:
    """Zero the times of overlay whiteouts (character devices 0/0), made at apply time."""
    return {
        path: dataclasses.replace(entry, mtime_ns=0)
        if entry.kind == "char" and entry.device == (0, 0)
        else entry
        for path, entry in tree.items()
    }


def lock_files(sn: LayerSnapshotter) -> list[str]:
    folder = sn.root / "images" / "locks"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def committed_keys(sn: LayerSnapshotter) -> set[str]:
    return {info.name for info in sn.list() if info.kind is Kind.COMMITTED}


# ---------------------------------------------------------------- chain ids


def test_chain_ids_follow_the_oci_formula() -> None:
    a = "sha256:" + "a" * 64
    b = "sha256:" + "b" * 64
    c = "sha256:" + "c" * 64
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []


# ---------------------------------------------------------------- formats and parallel unpack


@pytest.mark.parametrize("name", ["busybox", "debian"])
def test_oci_and_docker_archives_give_one_tree(name: str, tmp_path: Path) -> None:
    trees = {}
    for fmt in ("oci", "docker"):
        sn = open_snapshotter(tmp_path / f"root-{fmt}")
        try:
            result = import_image(sn, image_archive(name, fmt), name=name)
            assert len(result.created) == len(result.image.diff_ids)
            assert committed_keys(sn) == set(result.chain_ids)
            trees[fmt] = merged_tree(sn, name, tmp_path / f"mnt-{fmt}")
        finally:
            sn.close()
    assert len(trees["oci"]) > 100
    assert_trees_equal(trees["oci"], trees["docker"], mtimes="non-dirs")


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_parallel_unpack_equals_sequential(fmt: str, tmp_path: Path) -> None:
    layers: dict[int, dict[str, dict[str, EntryRecord]]] = {}
    trees = {}
    for jobs in (1, 4):
        sn = open_snapshotter(tmp_path / f"root-{jobs}")
        try:
            result = import_image(sn, image_archive("debian", fmt), name="debian", jobs=jobs)
            trees[jobs] = merged_tree(sn, "debian", tmp_path / f"mnt-{jobs}")
            # Each layer's own directory, whiteouts and all, must match too.
            layers[jobs] = {
                chain_id: without_whiteout_times(snapshot_tree(sn.snapshot_dirs(chain_id).fs))
                for chain_id in result.chain_ids
            }
        finally:
            sn.close()
    assert_trees_equal(trees[1], trees[4], mtimes="all")
    assert layers[1].keys() == layers[4].keys()
    for chain_id in layers[1]:
        # Directories a layer only implies get the time of the apply, as whiteouts do.
        assert_trees_equal(layers[1][chain_id], layers[4][chain_id], mtimes="non-dirs")


def test_debian_layers_keep_special_files(store: LayerSnapshotter, tmp_path: Path) -> None:
    import_image(store, image_archive("debian", "oci"), name="debian")
    tree = merged_tree(store, "debian", tmp_path / "mnt")
    special = {path: entry for path, entry in tree.items() if path.startswith("srv/special/")}
    xattr_names = {name for entry in special.values() for name, _ in entry.xattrs}

    assert "usr/share/doc/README" in tree  # a directory deleted and made again
    assert "usr/share/man" not in tree  # whiteout of a directory
    assert "usr/bin/yes" not in tree  # whiteout of a file
    assert any(entry.kind == "fifo" for entry in special.values())
    assert any(entry.device == (1, 3) for entry in special.values())
    assert any(entry.mode & 0o4000 for entry in special.values())
    assert any(entry.mode & 0o2000 for entry in special.values())
    assert any(entry.links for entry in special.values())
    assert any(entry.target is not None for entry in special.values())
    assert "security.capability" in xattr_names
    assert any(name.startswith("user.lamina.") for name in xattr_names)


def test_reimport_reuses_every_layer(store: LayerSnapshotter) -> None:
    first = import_image(store, image_archive("busybox", "oci"), name="busybox")
    before = committed_keys(store)
    again = import_image(store, image_archive("busybox", "docker"), name="busybox-docker")
    assert again.created == []
    assert again.reused == first.chain_ids
    assert committed_keys(store) == before
    assert again.image.chain_id == first.image.chain_id
    assert again.image.config_digest == first.image.config_digest


def test_docker_manifest_digest_same_when_layers_reused(store: LayerSnapshotter) -> None:
    # A docker-archive has no manifest blob: the one Lamina writes for it must
    # not depend on whether its layers were unpacked or reused.
    first = import_image(store, image_archive("busybox", "docker"), name="first")
    again = import_image(store, image_archive("busybox", "docker"), name="again")
    assert again.created == []
    assert again.image.manifest_digest == first.image.manifest_digest
    assert again.image.size == first.image.size


# ---------------------------------------------------------------- records


def test_image_records_list_inspect_remove(store: LayerSnapshotter) -> None:
    result = import_image(store, image_archive("busybox", "oci"), name="bb")
    record = get_image(store, "bb")
    assert record.platform == str(Platform.host())
    assert record.chain_id == result.chain_ids[-1]
    assert record.manifest_digest.startswith("sha256:")
    assert record.size > 0
    assert [r.name for r in list_images(store)] == ["bb"]

    details = inspect_image(store, "bb")
    layers: list[dict[str, Any]] = details["layers"]  # type: ignore[assignment]
    assert [layer["chain_id"] for layer in layers] == result.chain_ids
    assert all(layer["present"] for layer in layers)

    assert remove_image(store, "bb") == list(reversed(result.chain_ids))
    assert list_images(store) == []
    assert committed_keys(store) == set()
    assert lock_files(store) == []


def test_remove_keeps_layers_other_images_need(store: LayerSnapshotter) -> None:
    first = import_image(store, image_archive("busybox", "oci"), name="bb")
    import_image(store, image_archive("busybox", "docker"), name="same-layers")
    assert remove_image(store, "bb") == []
    assert committed_keys(store) == set(first.chain_ids)
    assert len(lock_files(store)) == 2 * len(first.chain_ids)
    assert remove_image(store, "same-layers") == list(reversed(first.chain_ids))
    assert lock_files(store) == []


def test_remove_keeps_layers_under_a_container(store: LayerSnapshotter) -> None:
    result = import_image(store, image_archive("debian", "oci"), name="bb")
    prepare_rootfs(store, "bb", "container-1")
    assert remove_image(store, "bb") == []
    assert committed_keys(store) == set(result.chain_ids)
    with pytest.raises(FailedPreconditionError):
        store.remove(result.chain_ids[-1])

    store.remove("container-1")
    assert prune_images(store) == list(reversed(result.chain_ids))
    assert committed_keys(store) == set()
    assert lock_files(store) == []


def test_prune_deletes_lock_files_of_removed_snapshots(store: LayerSnapshotter) -> None:
    result = import_image(store, image_archive("busybox", "oci"), name="bb")
    store.remove(result.chain_ids[-1])  # as containerd's garbage collector would
    prune_images(store)
    remaining = {name.rpartition(".")[0] for name in lock_files(store)}
    assert remaining == {c.replace(":", "-") for c in result.chain_ids[:-1]}


def test_prune_keeps_image_layers_and_user_snapshots(store: LayerSnapshotter) -> None:
    result = import_image(store, image_archive("busybox", "oci"), name="bb")
    store.prepare("mine", "")
    store.commit("mine-committed", "mine")
    assert prune_images(store) == []
    assert committed_keys(store) == {*result.chain_ids, "mine-committed"}


def test_same_name_replaces_record(store: LayerSnapshotter) -> None:
    import_image(store, image_archive("busybox", "oci"), name="img")
    debian = import_image(store, image_archive("debian", "oci"), name="img")
    assert [r.name for r in list_images(store)] == ["img"]
    assert get_image(store, "img").chain_id == debian.image.chain_id
    # busybox's layer was needed by nothing else and went with the old record.
    assert committed_keys(store) == set(debian.chain_ids)


# ---------------------------------------------------------------- platforms


def write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_multi_platform(layout: Path) -> None:
    """Turn a one-image layout into a nested index of an amd64 and an arm64 image."""
    index = json.loads((layout / "index.json").read_text())
    amd64 = index["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / amd64["digest"][7:]).read_bytes())
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    config["architecture"] = "arm64"
    manifest["config"].update(write_blob(layout, json.dumps(config).encode()))
    arm64 = {"mediaType": amd64["mediaType"], **write_blob(layout, json.dumps(manifest).encode())}
    nested = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {**arm64, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {
                "mediaType": amd64["mediaType"],
                "digest": amd64["digest"],
                "size": amd64["size"],
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    top = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        **write_blob(layout, json.dumps(nested).encode()),
        "annotations": {"org.opencontainers.image.ref.name": "example.com/multi:1"},
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))


def test_multi_platform_index_selects_platform(store: LayerSnapshotter, tmp_path: Path) -> None:
    layout = extract_archive(image_archive("busybox", "oci"), tmp_path / "layout")
    make_multi_platform(layout)

    arm = import_image(store, layout, platform=Platform.parse("linux/arm64"))
    assert arm.image.name == "example.com/multi:1"
    assert arm.image.platform == "linux/arm64"
    amd = import_image(store, layout, name="amd", platform=Platform.parse("linux/amd64"))
    assert amd.image.platform == "linux/amd64"
    assert amd.image.config_digest != arm.image.config_digest
    # Same layers: the second import unpacked nothing.
    assert amd.created == []


# ---------------------------------------------------------------- concurrency

_IMPORT_SCRIPT = """
import json, sys
from pathlib import Path
from lamina.drivers import open_snapshotter
from lamina.images import import_image
sn = open_snapshotter(sys.argv[1])
result = import_image(sn, Path(sys.argv[2]), name=sys.argv[3], jobs=2)
print(json.dumps({"created": result.created, "reused": result.reused}))
"""


def shorter_image(layout: Path, keep: int) -> None:
    """Make LAYOUT's image the first KEEP layers of itself (a base shared with the original)."""
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(manifest_path.read_bytes())
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:keep]
    config.pop("history", None)
    manifest["layers"] = manifest["layers"][:keep]
    manifest["config"].update(write_blob(layout, json.dumps(config).encode()))
    index["manifests"][0].update(write_blob(layout, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


def test_concurrent_imports_share_base_layers(lamina_root: Path, tmp_path: Path) -> None:
    """Two processes importing images with common base layers unpack each layer once."""
    full = image_archive("debian", "oci")
    base = extract_archive(full, tmp_path / "base")
    shorter_image(base, 3)
    # Create the store first: both processes then open an existing root.
    open_snapshotter(lamina_root).close()

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _IMPORT_SCRIPT, str(lamina_root), str(archive), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for archive, name in ((full, "full"), (base, "base"))
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        outputs.append(json.loads(stdout))

    created = outputs[0]["created"] + outputs[1]["created"]
    assert len(created) == len(set(created)), "a shared layer was unpacked twice"
    sn = open_snapshotter(lamina_root)
    try:
        full_record = get_image(sn, "full")
        base_record = get_image(sn, "base")
        assert set(created) == committed_keys(sn)
        assert len(committed_keys(sn)) == len(full_record.diff_ids)
        assert base_record.chain_id == chain_ids(full_record.diff_ids)[2]
        assert list(sn.list("kind==active")) == []
    finally:
        sn.close()


def test_docker_archive_with_layer_folders(store: LayerSnapshotter, tmp_path: Path) -> None:
    """The older `docker save` layout: each layer as ID/layer.tar, named by no digest."""
    folder = extract_archive(image_archive("busybox", "docker"), tmp_path / "docker")
    entries = json.loads((folder / "manifest.json").read_text())
    layers = []
    for i, path in enumerate(entries[0]["Layers"]):
        data = (folder / path).read_bytes()
        (folder / path).unlink()
        layer_dir = folder / f"{i:064x}"
        layer_dir.mkdir(exist_ok=True)
        (layer_dir / "layer.tar").write_bytes(data)
        layers.append(f"{i:064x}/layer.tar")
    entries[0]["Layers"] = layers
    (folder / "manifest.json").write_text(json.dumps(entries))

    result = import_image(store, folder, name="old-docker")
    expected = import_image(store, image_archive("busybox", "oci"), name="oci")
    assert result.chain_ids == expected.chain_ids
    assert expected.created == []
