"""Corrupt image archives: each import fails with a clear error class and leaves nothing behind.

Each case edits a real archive (the busybox or debian test image) the way
a broken download or a bad tool would, keeping every other document
consistent, so that the one fault is the one the importer must find.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from images import extract_archive, image_archive

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import InvalidArgumentError, NotFoundError
from lamina.images import import_image, list_images
from lamina.images.errors import DigestMismatchError, InvalidImageError, PlatformNotFoundError

# ---------------------------------------------------------------- editing an OCI layout


class Layout:
    """An extracted OCI image layout whose documents can be rewritten consistently."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def blob(self, digest: str) -> Path:
        algorithm, encoded = digest.split(":")
        return self.path / "blobs" / algorithm / encoded

    def index(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.path / "index.json").read_text())
        return document

    def manifest_descriptor(self) -> dict[str, Any]:
        descriptor: dict[str, Any] = self.index()["manifests"][0]
        return descriptor

    def manifest(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            self.blob(self.manifest_descriptor()["digest"]).read_bytes()
        )
        return document

    def config(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            self.blob(self.manifest()["config"]["digest"]).read_bytes()
        )
        return document

    def write_blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def set_manifest_bytes(self, data: bytes) -> None:
        index = self.index()
        index["manifests"][0].update(self.write_blob(data))
        (self.path / "index.json").write_text(json.dumps(index))

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        self.set_manifest_bytes(json.dumps(manifest).encode())

    def set_config(self, config: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["config"].update(self.write_blob(json.dumps(config).encode()))
        self.set_manifest(manifest)

    def set_layer_bytes(self, index: int, data: bytes) -> None:
        manifest = self.manifest()
        manifest["layers"][index].update(self.write_blob(data))
        self.set_manifest(manifest)

    def layer_bytes(self, index: int) -> bytes:
        return self.blob(self.manifest()["layers"][index]["digest"]).read_bytes()


@pytest.fixture
def busybox_layout(tmp_path: Path) -> Layout:
    return Layout(extract_archive(image_archive("busybox", "oci"), tmp_path / "busybox"))


@pytest.fixture
def store(lamina_root: Path) -> LayerSnapshotter:
    sn = open_snapshotter(lamina_root)
    yield sn
    sn.close()


def assert_nothing_left(sn: LayerSnapshotter) -> None:
    assert list(sn.list()) == []
    assert list_images(sn) == []
    staging = sn.root / "images" / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []


# ---------------------------------------------------------------- the cases


def wrong_blob_digest(layout: Layout) -> None:
    blob = layout.blob(layout.manifest()["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def wrong_diff_id(layout: Layout) -> None:
    config = layout.config()
    config["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
    layout.set_config(config)


def missing_blob(layout: Layout) -> None:
    layout.blob(layout.manifest()["layers"][0]["digest"]).unlink()


def truncated_layer(layout: Layout) -> None:
    # Descriptors match the truncated blob, so only the stream itself is wrong.
    data = layout.layer_bytes(0)
    layout.set_layer_bytes(0, data[: len(data) // 2])


def truncated_blob(layout: Layout) -> None:
    blob = layout.blob(layout.manifest()["layers"][0]["digest"])
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) - 100])


def no_matching_platform(layout: Layout) -> None:
    index = layout.index()
    index["manifests"][0]["platform"] = {"os": "linux", "architecture": "s390x"}
    (layout.path / "index.json").write_text(json.dumps(index))


def manifest_not_json(layout: Layout) -> None:
    layout.set_manifest_bytes(b"this is not JSON {")


def index_not_json(layout: Layout) -> None:
    (layout.path / "index.json").write_text("[1, 2")


def gzip_garbage(layout: Layout) -> None:
    data = layout.layer_bytes(0)
    layout.set_layer_bytes(0, data[:20] + b"\x00garbage" * 100 + data[900:])


CASES: list[tuple[str, Callable[[Layout], None], type[Exception]]] = [
    ("wrong-blob-digest", wrong_blob_digest, DigestMismatchError),
    ("wrong-diff-id", wrong_diff_id, DigestMismatchError),
    ("missing-blob", missing_blob, InvalidImageError),
    ("truncated-layer-stream", truncated_layer, InvalidArgumentError),
    ("truncated-blob", truncated_blob, DigestMismatchError),
    ("no-matching-platform", no_matching_platform, PlatformNotFoundError),
    ("manifest-not-json", manifest_not_json, InvalidImageError),
    ("index-not-json", index_not_json, InvalidImageError),
    ("corrupt-gzip", gzip_garbage, InvalidArgumentError),
]


def pack(folder: Path, target: Path) -> Path:
    """Write FOLDER as an uncompressed tar (an oci-archive)."""
    with tarfile.open(target, "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return target


@pytest.mark.parametrize(
    ("fault", "error"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("container", ["folder", "tar", "tar.gz"])
def test_corrupt_oci_archive_rejected(
    store: LayerSnapshotter,
    busybox_layout: Layout,
    tmp_path: Path,
    fault: Callable[[Layout], None],
    error: type[Exception],
    container: str,
) -> None:
    fault(busybox_layout)
    archive = busybox_layout.path
    if container != "folder":
        archive = pack(busybox_layout.path, tmp_path / "image.tar")
    if container == "tar.gz":
        compressed = tmp_path / "image.tar.gz"
        with open(archive, "rb") as plain, gzip.open(compressed, "wb") as out:
            shutil.copyfileobj(plain, out)
        archive = compressed

    with pytest.raises(error):
        import_image(store, archive, name="broken")

    assert_nothing_left(store)
    assert not list((store.root / "images" / "tmp").glob("*"))


def test_corrupt_upper_layer_rolls_back_lower_layers(
    store: LayerSnapshotter, tmp_path: Path
) -> None:
    """Layers committed before the faulty one are removed again."""
    layout = Layout(extract_archive(image_archive("debian", "oci"), tmp_path / "debian"))
    last = len(layout.manifest()["layers"]) - 1
    data = bytearray(layout.layer_bytes(last))
    data[-30] ^= 0x55  # inside the gzip trailer: the CRC or size no longer matches
    layout.set_layer_bytes(last, bytes(data))

    for jobs in (1, 3):
        with pytest.raises(InvalidArgumentError):
            import_image(store, layout.path, name="debian", jobs=jobs)
        assert_nothing_left(store)


def docker_layout(tmp_path: Path) -> Path:
    return extract_archive(image_archive("busybox", "docker"), tmp_path / "docker")


def test_docker_archive_truncated_layer(store: LayerSnapshotter, tmp_path: Path) -> None:
    folder = docker_layout(tmp_path)
    entry = json.loads((folder / "manifest.json").read_text())[0]
    layer = (folder / entry["Layers"][0]).resolve()
    layer.write_bytes(layer.read_bytes()[:-3000])

    with pytest.raises(InvalidArgumentError):
        import_image(store, pack(folder, tmp_path / "busybox.docker.tar"), name="broken")
    assert_nothing_left(store)


def test_docker_archive_missing_layer(store: LayerSnapshotter, tmp_path: Path) -> None:
    folder = docker_layout(tmp_path)
    entry = json.loads((folder / "manifest.json").read_text())[0]
    (folder / entry["Layers"][0]).unlink()

    with pytest.raises(InvalidImageError):
        import_image(store, folder, name="broken")
    assert_nothing_left(store)


def test_docker_archive_manifest_not_json(store: LayerSnapshotter, tmp_path: Path) -> None:
    folder = docker_layout(tmp_path)
    (folder / "manifest.json").write_text("{not json")

    with pytest.raises(InvalidImageError):
        import_image(store, folder, name="broken")
    assert_nothing_left(store)


def test_docker_archive_wrong_diff_id(store: LayerSnapshotter, tmp_path: Path) -> None:
    folder = docker_layout(tmp_path)
    entry = json.loads((folder / "manifest.json").read_text())[0]
    config_path = folder / entry["Config"]
    config = json.loads(config_path.read_text())
    config["rootfs"]["diff_ids"][0] = "sha256:" + "1" * 64
    # The config file is named by its digest; rename it so only the diff id is wrong.
    data = json.dumps(config).encode()
    renamed = hashlib.sha256(data).hexdigest() + ".json"
    config_path.unlink()
    (folder / renamed).write_bytes(data)
    entry["Config"] = renamed
    (folder / "manifest.json").write_text(json.dumps([entry]))

    with pytest.raises(DigestMismatchError):
        import_image(store, folder, name="broken")
    assert_nothing_left(store)


def test_not_an_image_archive(store: LayerSnapshotter, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidImageError):
        import_image(store, tmp_path / "empty")
    with pytest.raises(NotFoundError):
        import_image(store, tmp_path / "does-not-exist.tar")
    assert_nothing_left(store)


def test_unknown_image_name_is_not_found(store: LayerSnapshotter) -> None:
    from lamina.images import get_image, remove_image

    with pytest.raises(NotFoundError):
        get_image(store, "nothing")
    with pytest.raises(NotFoundError):
        remove_image(store, "nothing")
