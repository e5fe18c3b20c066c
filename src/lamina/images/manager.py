"""Image operations on a snapshotter: import, list, inspect, remove, prune.

An image is a record in the metadata store (lamina.metadata.images) naming
the top of a chain of committed snapshots, one per layer, each named by
its chain id. Removing an image removes the snapshots of its chain that
nothing else needs, from the top down. A snapshot stays while it is the
top of another image, while it has children (a container's Active
snapshot, or a layer of another image), or while an import in flight has
its `use` lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lamina.archive import detect_compression
from lamina.drivers import LayerSnapshotter
from lamina.drivers import dirs as snapshot_dirs
from lamina.errors import FailedPreconditionError, LaminaError, NotFoundError
from lamina.images.apply import docker_layer_type
from lamina.images.digest import chain_ids, sha256_digest
from lamina.images.locks import LOCKS_DIR, ChainLock, delete_lock_files
from lamina.images.oci import Platform
from lamina.images.progress import Progress
from lamina.images.resolve import DOCKER, resolve_image
from lamina.images.source import Source, open_source
from lamina.images.unpack import DIFF_ID_LABEL, STAGING_DIR, Unpacker
from lamina.metadata import images as records
from lamina.metadata.images import ImageRecord
from lamina.snapshots.types import Kind

log = logging.getLogger(__name__)

SCRATCH_DIR = ("images", "tmp")
_ARCHIVE_SUFFIXES = re.compile(
    r"(\.(oci|docker))?(\.tar)?(\.(gz|tgz|zst|zstd|bz2|xz))?$", re.IGNORECASE
)
# Key of an import's Active snapshot: "import PID-TOKEN CHAIN_ID" (lamina.images.unpack).
_IMPORT_KEY = re.compile(r"import (\d+)-[0-9a-f]+ \S+")


@dataclass(frozen=True)
class ImportResult:
    """An imported image, with what the import unpacked and reused."""

    image: ImageRecord
    chain_ids: list[str]
    created: list[str]
    reused: list[str]
    seconds: float

    def to_json(self) -> dict[str, object]:
        """Return the result as a JSON-ready mapping."""
        return {
            **self.image.to_json(),
            "chain_ids": self.chain_ids,
            "layers_unpacked": len(self.created),
            "layers_reused": len(self.reused),
            "seconds": round(self.seconds, 3),
        }


def default_name(archive: Path) -> str:
    """Return an image name made from an archive's file name: "debian.oci.tar" gives "debian"."""
    name = archive.resolve().name if archive.name in ("", ".", "..") else archive.name
    stem = _ARCHIVE_SUFFIXES.sub("", name)
    return stem or name


def import_image(
    sn: LayerSnapshotter,
    archive: Path,
    *,
    name: str | None = None,
    platform: Platform | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    """Import the image ARCHIVE holds for PLATFORM (default: this machine's) as NAME.

    NAME defaults to the name the archive records (a tag or a ref name
    annotation), else to the archive's file name. An image of the same
    name is replaced. Raises InvalidImageError for a malformed archive,
    DigestMismatchError for a blob that fails verification and
    PlatformNotFoundError when no image matches PLATFORM; nothing is
    committed or recorded then.
    """
    started = time.monotonic()
    if name is not None:
        records.validate_name(name, "import")
    requested = platform or Platform.host()
    scratch = sn.root.joinpath(*SCRATCH_DIR)

    with open_source(archive, scratch) as source:
        image = resolve_image(source, requested)
        image_name = name or image.name_hint or default_name(archive)
        records.validate_name(image_name, "import")
        log.debug(
            "import %s: %s archive, %d layers, platform %s",
            archive,
            image.archive_format,
            len(image.layers),
            image.platform,
        )
        with Unpacker(sn, source, image, name=image_name, jobs=jobs, progress=progress) as unpacker:
            unpacked = unpacker.unpack()
            # Layers reused from the store were not read. Hash them, and for a
            # docker-archive detect their compression, from the archive.
            digests = [
                digest or _file_digest(source, layer.path)
                for digest, layer in zip(unpacked.layer_digests, image.layers, strict=True)
            ]
            layer_types = [
                layer_type or docker_layer_type(_blob_compression(source, layer.path))
                for layer_type, layer in zip(unpacked.media_types, image.layers, strict=True)
            ]
            manifest_digest = image.manifest_digest
            manifest_size = image.manifest_size
            media_type = image.manifest_media_type
            if image.archive_format == DOCKER or manifest_digest is None:
                layers = tuple(
                    dataclasses.replace(layer, media_type=layer_type)
                    for layer, layer_type in zip(image.layers, layer_types, strict=True)
                )
                document = dataclasses.replace(image, layers=layers).docker_manifest(digests)
                manifest_digest = sha256_digest(document)
                manifest_size = len(document)
            record = ImageRecord(
                name=image_name,
                manifest_digest=manifest_digest,
                config_digest=image.config_digest,
                media_type=media_type,
                platform=str(image.platform),
                chain_id=unpacked.chain_ids[-1] if unpacked.chain_ids else "",
                diff_ids=image.diff_ids,
                size=image.content_size - image.manifest_size + manifest_size,
            )
            try:
                with sn.store.write("import image") as tx:
                    previous = records.find_image(tx, image_name)
                    stored = records.put_image(tx, record)
            except BaseException:
                unpacker.roll_back(unpacked.created)
                raise

    if previous is not None and previous.chain_id != stored.chain_id:
        _release_chain(sn, previous)
    seconds = time.monotonic() - started
    log.info(
        "imported image %s (%s): %d layers unpacked, %d reused, in %.2f s",
        image_name,
        stored.manifest_digest,
        len(unpacked.created),
        len(unpacked.reused),
        seconds,
    )
    return ImportResult(stored, unpacked.chain_ids, unpacked.created, unpacked.reused, seconds)


def _file_digest(source: Source, path: str) -> str:
    hasher = hashlib.sha256()
    with source.open(path) as reader:
        while chunk := reader.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _blob_compression(source: Source, path: str) -> str:
    """Return the compression of blob PATH ("none", "gzip" or "zstd") from its first bytes."""
    with source.open(path) as reader:
        head = reader.read(4)
    return detect_compression(head).value


# ---------------------------------------------------------------- reading


def list_images(sn: LayerSnapshotter) -> list[ImageRecord]:
    """Return every image record, sorted by name."""
    with sn.store.read("list images") as tx:
        return records.list_images(tx)


def get_image(sn: LayerSnapshotter, name: str, operation: str = "inspect image") -> ImageRecord:
    """Return the record of image NAME; NotFoundError if there is none."""
    with sn.store.read(operation) as tx:
        return records.get_image(tx, name, operation)


def inspect_image(sn: LayerSnapshotter, name: str) -> dict[str, object]:
    """Return the record of image NAME with its layers: diff id, chain id, snapshot state."""
    record = get_image(sn, name)
    layers: list[dict[str, object]] = []
    unpacked_size = 0
    for diff_id, chain_id in zip(record.diff_ids, chain_ids(record.diff_ids), strict=True):
        present = True
        size = None
        try:
            usage = sn.usage(chain_id)
            size = usage.size
            unpacked_size += usage.size
        except NotFoundError:
            present = False
        layers.append({"diff_id": diff_id, "chain_id": chain_id, "present": present, "size": size})
    return {**record.to_json(), "unpacked_size": unpacked_size, "layers": layers}


# ---------------------------------------------------------------- removal


def _try_remove(sn: LayerSnapshotter, chain_id: str) -> bool:
    """Remove committed snapshot CHAIN_ID unless something still needs it; True if removed."""
    with sn.store.read("remove image") as tx:
        if records.images_on_chain(tx, chain_id):
            return False
    lock = ChainLock(sn.root, chain_id, "use")
    try:
        if not lock.try_exclusive():
            log.debug("keeping %s: an import in flight uses it", chain_id)
            return False
        with sn.store.read("remove image") as tx:
            if records.images_on_chain(tx, chain_id):
                return False
        sn.remove(chain_id)
        delete_lock_files(lock)
    except NotFoundError:
        return False
    except FailedPreconditionError:
        log.debug("keeping %s: it has children", chain_id)
        return False
    finally:
        lock.close()
    return True


def _release_chain(sn: LayerSnapshotter, record: ImageRecord) -> list[str]:
    """Remove the snapshots of RECORD's chain that nothing else needs, top first."""
    removed: list[str] = []
    for chain_id in reversed(chain_ids(record.diff_ids)):
        if _try_remove(sn, chain_id):
            removed.append(chain_id)
            continue
        try:
            sn.stat(chain_id)
        except NotFoundError:
            continue  # already gone: look further down
        break
    return removed


def remove_image(sn: LayerSnapshotter, name: str) -> list[str]:
    """Remove image NAME and the snapshots no other image or container needs.

    Returns the chain ids of the snapshots removed.
    """
    with sn.store.write("remove image") as tx:
        record = records.delete_image(tx, name, "remove image")
    removed = _release_chain(sn, record)
    log.info("removed image %s and %d snapshots", name, len(removed))
    return removed


def prune_images(sn: LayerSnapshotter) -> list[str]:
    """Remove what imports left that no image needs; return what was removed.

    Three kinds of leftovers go. First, committed layer snapshots (those
    an import labelled with their diff id) that are no image's top and
    have no children, repeated down each chain. Second, Active snapshots
    of imports whose process is gone. Third, staging directories that no
    live import has locked.
    """
    removed: list[str] = []
    removed += _prune_import_actives(sn)
    removed += _prune_staging(sn)
    _prune_lock_files(sn)
    while True:
        parents = {
            info.name: info.parent
            for info in sn.list(f'kind==committed,labels."{DIFF_ID_LABEL}"')
            if info.kind is Kind.COMMITTED
        }
        round_removed: list[str] = []
        for candidate in parents:
            # Removing a snapshot may leave its parent unneeded: follow the chain down.
            current = candidate
            while current in parents and current not in round_removed:
                if not _try_remove(sn, current):
                    break
                round_removed.append(current)
                current = parents[current]
        if not round_removed:
            break
        removed += round_removed
    log.info("prune removed %d snapshots and directories", len(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune_import_actives(sn: LayerSnapshotter) -> list[str]:
    removed: list[str] = []
    for info in sn.list("kind==active"):
        match = _IMPORT_KEY.fullmatch(info.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            sn.remove(info.name)
            removed.append(info.name)
        except LaminaError as err:
            log.warning("prune: could not remove key=%r: %s", info.name, err)
    return removed


def _prune_staging(sn: LayerSnapshotter) -> list[str]:
    staging = sn.root.joinpath(*STAGING_DIR)
    removed: list[str] = []
    if not staging.is_dir():
        return removed
    for entry in os.scandir(staging):
        path = Path(entry.path)
        holder = snapshot_dirs.try_lock_dir(path)
        if holder is None:
            continue  # a live import is writing it
        try:
            snapshot_dirs.remove_tree(path)
            removed.append(str(path))
        except (OSError, LaminaError) as err:
            log.warning("prune: could not remove path=%s: %s", path, err)
        finally:
            holder.release()
    return removed


def _prune_lock_files(sn: LayerSnapshotter) -> None:
    """Delete the lock files of chain ids whose snapshot is gone.

    A snapshot removed by Lamina's own image commands takes its lock files
    along. One removed otherwise (`lamina snapshots rm`, containerd's
    garbage collector) leaves them behind.
    """
    folder = sn.root.joinpath(*LOCKS_DIR)
    if not folder.is_dir():
        return
    chains = {name.rpartition(".")[0] for name in os.listdir(folder)}
    deleted = 0
    for stem in sorted(chains):
        algorithm, _, encoded = stem.partition("-")
        chain_id = f"{algorithm}:{encoded}"
        if _snapshot_exists(sn, chain_id):
            continue
        try:
            lock = ChainLock(sn.root, chain_id, "use")
        except LaminaError as err:
            log.warning("prune: ignoring lock file %s of no chain id: %s", stem, err)
            continue
        try:
            # An import in flight holds the lock and may create the snapshot.
            if lock.try_exclusive() and not _snapshot_exists(sn, chain_id):
                delete_lock_files(lock)
                deleted += 1
        finally:
            lock.close()
    log.debug("prune deleted the lock files of %d chain ids", deleted)


def _snapshot_exists(sn: LayerSnapshotter, key: str) -> bool:
    try:
        sn.stat(key)
    except NotFoundError:
        return False
    return True
