"""Unpack the layers of a resolved image into a chain of committed snapshots.

Layer N is committed under its chain id, so a layer already present is
reused and never unpacked twice. Each import takes the `use` lock of every
chain id of its image and the `create` lock of each layer it unpacks (see
lamina.images.locks). A second import of a shared layer therefore waits
for the first and then reuses its snapshot.

Sequential unpack (any driver): prepare an Active snapshot on the previous
layer, apply the layer into it, verify, commit under the chain id.

Parallel unpack (overlay): an overlay layer directory does not depend on
the layers below it, except for two things the applier reads from lower
layers: the attributes of a parent directory the tar does not list, and
the content of a lower file that a hard link in the layer names. So up to
`jobs` layers are applied at once, each into a staging directory under
ROOT/images/staging. They are committed in order. For each, rename(2)
puts the staging directory in place of the empty upper directory of an
Active snapshot prepared on the previous layer, and that snapshot is
committed. A layer whose apply
looks into a lower layer waits at that point until every layer below it
is committed (lamina.images.apply), so the result equals a sequential
unpack. Memory stays bounded: `jobs` layer streams at a time, each with a
bounded decompression queue.

A failed import removes its staging directories and Active snapshots and
every snapshot it committed that no other import holds a `use` lock on.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lamina.drivers import LayerSnapshotter
from lamina.drivers import dirs as snapshot_dirs
from lamina.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
    UnavailableError,
)
from lamina.images import apply as layer_apply
from lamina.images.digest import chain_ids, parse_digest, short
from lamina.images.errors import DigestMismatchError
from lamina.images.locks import ChainLock, delete_lock_files
from lamina.images.progress import LayerState, NoProgress, Progress
from lamina.images.resolve import LayerBlob, ResolvedImage
from lamina.images.source import BlobReader, Source
from lamina.mount import split_overlay_dirs, temporary_mount
from lamina.snapshots.types import Kind, Mount

log = logging.getLogger(__name__)

STAGING_DIR = ("images", "staging")
# Label on each snapshot an import commits: the diff id of its own layer.
DIFF_ID_LABEL = "lamina.io/diff-id"


def staging_dir(root: Path) -> Path:
    """Return ROOT/images/staging, creating it if needed."""
    path = root.joinpath(*STAGING_DIR)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def default_jobs() -> int:
    """Return the default number of layers unpacked at once: half the usable cores, 1 to 4.

    Each layer being applied already keeps a second core busy with its
    decompression thread, and the appliers of several layers share one
    interpreter lock. On a 2-core VM with other work running, importing the
    debian test image (5 layers, 62 MB) took 5.1 s with --jobs 1 and with
    --jobs 2, and --jobs 2 used 17 MiB more memory. So the default is half
    the cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 4))


# ---------------------------------------------------------------- verified blob reading


class VerifyingReader(io.RawIOBase):
    """A layer blob's bytes, hashed and counted as they are read.

    `check` compares the digest and the size with the expected ones once
    the blob was read to its end.
    """

    def __init__(
        self, blob: BlobReader, layer: LayerBlob, on_bytes: Callable[[int], None] | None
    ) -> None:
        super().__init__()
        self._blob = blob
        self._layer = layer
        algorithm = parse_digest(layer.digest)[0] if layer.digest else "sha256"
        self._hash = hashlib.new(algorithm)
        self._algorithm = algorithm
        self.count = 0
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        count = self._blob.readinto(buffer)
        if count:
            view = memoryview(buffer)[:count]
            self._hash.update(view)
            self.count += count
            if self._on_bytes is not None:
                self._on_bytes(count)
        return count

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"

    def check(self) -> str:
        """Read what is left, then verify size and digest; return the digest."""
        while self.read(1 << 20):
            pass
        name = self._layer.digest or self._layer.path
        if self.count != self._layer.size:
            raise DigestMismatchError(
                f"layer {name}: read {self.count} bytes, expected {self._layer.size}; the "
                "archive is corrupt or truncated",
                subject=name,
            )
        if self._layer.digest is not None and self.digest != self._layer.digest:
            raise DigestMismatchError(
                f"layer {name}: blob content hashes to {self.digest}; the archive is corrupt",
                subject=name,
            )
        return self.digest

    def close(self) -> None:
        self._blob.close()
        super().close()


# ---------------------------------------------------------------- the unpacker


@dataclass
class UnpackResult:
    """Outcome of an unpack: chain ids bottom first, and each layer's blob digest."""

    chain_ids: list[str]
    layer_digests: list[str | None]
    media_types: list[str]
    created: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


@dataclass
class _Staged:
    """A layer applied into a staging directory, waiting for its turn to commit."""

    path: Path
    holder: snapshot_dirs.LockedDir
    digest: str
    media_type: str


class Unpacker:
    """Unpacks one resolved image into the snapshotter; use once, as a context manager.

    The `use` locks taken by `unpack` stay held until the context exits, so
    the caller writes the image record first and the snapshots cannot be
    pruned in between.
    """

    def __init__(
        self,
        snapshotter: LayerSnapshotter,
        source: Source,
        image: ResolvedImage,
        *,
        name: str = "",
        jobs: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.sn = snapshotter
        self.source = source
        self.image = image
        self.name = name or image.name_hint
        self.jobs = max(1, jobs if jobs is not None else default_jobs())
        self.progress = progress or NoProgress()
        self.chain = chain_ids(image.diff_ids)
        self._stack = ExitStack()
        self._use: dict[str, ChainLock] = {}
        self._create: dict[str, ChainLock] = {}
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Parallel unpack: layers below this index are committed.
        self._committed = threading.Condition()
        self._committed_below = 0
        self._aborted = False

    def __enter__(self) -> Unpacker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # ------------------------------------------------------------ helpers

    def _exists(self, chain_id: str) -> bool:
        try:
            info = self.sn.stat(chain_id)
        except NotFoundError:
            return False
        if info.kind is not Kind.COMMITTED:
            raise FailedPreconditionError(
                f"import: snapshot {chain_id!r} exists but is {info.kind}, not Committed; "
                "remove it and import again",
                subject=chain_id,
            )
        return True

    def _active_key(self, index: int) -> str:
        return f"import {self._token} {self.chain[index]}"

    def _parent(self, index: int) -> str:
        return self.chain[index - 1] if index > 0 else ""

    def _open_layer(self, layer: LayerBlob) -> VerifyingReader:
        def on_bytes(count: int) -> None:
            self.progress.layer_bytes(layer.index, count)

        return VerifyingReader(self.source.open(layer.path), layer, on_bytes)

    def _layer_name(self, layer: LayerBlob) -> str:
        return layer.digest or layer.path

    # ------------------------------------------------------------ locking

    def _lock_chain(self) -> list[int]:
        """Take the locks; return the indexes of the layers this import must unpack."""
        for chain_id in self.chain:
            if chain_id in self._use:
                continue
            lock = ChainLock(self.sn.root, chain_id, "use")
            self._stack.callback(lock.close)
            lock.shared()
            self._use[chain_id] = lock

        missing: list[int] = []
        for index, chain_id in enumerate(self.chain):
            if self._exists(chain_id):
                continue
            create = ChainLock(self.sn.root, chain_id, "create")
            self._stack.callback(create.close)
            create.exclusive()  # waits while another import unpacks this layer
            if self._exists(chain_id):
                create.close()
                continue
            self._create[chain_id] = create
            missing.append(index)
        return missing

    # ------------------------------------------------------------ unpack

    def unpack(self) -> UnpackResult:
        """Unpack every layer not yet present; raise and roll back on any failure."""
        layers = self.image.layers
        self.progress.start(self.name, [(self._layer_name(layer), layer.size) for layer in layers])
        result = UnpackResult(
            chain_ids=list(self.chain),
            layer_digests=[layer.digest for layer in layers],
            media_types=[layer.media_type for layer in layers],
        )
        try:
            missing = self._lock_chain()
            for index in range(len(layers)):
                if index not in missing:
                    result.reused.append(self.chain[index])
                    self.progress.layer_state(index, LayerState.REUSED)
            log.debug(
                "unpack: %d layers, %d present, %d to unpack",
                len(layers),
                len(layers) - len(missing),
                len(missing),
            )

            if self._parallel(missing):
                self._unpack_parallel(missing, result)
            else:
                for index in missing:
                    self._unpack_one(index, result)
        except BaseException:
            self.progress.finish(False)
            self.roll_back(result.created)
            raise
        self.progress.finish(True)
        return result

    def _parallel(self, missing: list[int]) -> bool:
        return self.jobs > 1 and len(missing) > 1 and self.sn.driver_name == "overlay"

    def _commit(self, index: int, key: str, result: UnpackResult) -> None:
        chain_id = self.chain[index]
        labels = {DIFF_ID_LABEL: self.image.layers[index].diff_id}
        try:
            self.sn.commit(chain_id, key, labels)
        except AlreadyExistsError:
            # Another writer that does not take Lamina's locks (containerd
            # through the gRPC service) committed the same layer: reuse it.
            log.info("layer=%s: snapshot %s appeared meanwhile, reusing it", index, chain_id)
            self.sn.remove(key)
            result.reused.append(chain_id)
        else:
            result.created.append(chain_id)
        # An import waiting to unpack the same layer may go on and reuse it.
        self._create.pop(chain_id).close()

    def _unpack_one(self, index: int, result: UnpackResult) -> None:
        """Unpack layer INDEX into an Active snapshot on its parent and commit it."""
        layer = self.image.layers[index]
        key = self._active_key(index)
        self.progress.layer_state(index, LayerState.UNPACKING)
        mounts = self.sn.prepare(key, self._parent(index))
        try:
            with self._open_layer(layer) as blob, _blob_errors(blob):
                if self.sn.driver_name == "overlay":
                    upper, lowers = self._overlay_dirs(key, mounts)
                    outcome = layer_apply.apply_overlay(
                        blob,
                        upper,
                        lowers,
                        layer=self._layer_name(layer),
                        diff_id=layer.diff_id,
                        userxattr=getattr(self.sn, "userxattr", False),
                    )
                elif _single_bind(mounts):
                    # The native driver's snapshot is a plain directory: apply
                    # into it without mounting anything.
                    outcome = layer_apply.apply_generic(
                        blob,
                        Path(mounts[0].source),
                        layer=self._layer_name(layer),
                        diff_id=layer.diff_id,
                    )
                else:
                    # Mount below the root, where fsck and cleanup look for
                    # mounts a killed import may leave behind.
                    mount_dir = self.sn.root / "images" / "mounts"
                    mount_dir.mkdir(parents=True, exist_ok=True)
                    with temporary_mount(mounts, parent_dir=mount_dir) as target:
                        outcome = layer_apply.apply_generic(
                            blob, target, layer=self._layer_name(layer), diff_id=layer.diff_id
                        )
                result.layer_digests[index] = blob.check()
                result.media_types[index] = layer.media_type or outcome.media_type
            self._commit(index, key, result)
        except BaseException:
            self.progress.layer_state(index, LayerState.FAILED)
            self._remove_quietly(key)
            raise
        self.progress.layer_state(index, LayerState.UNPACKED)

    # ------------------------------------------------------------ parallel

    def _overlay_dirs(
        self, key: str, mounts: list[Mount]
    ) -> tuple[Path, Sequence[layer_apply.LayerDir]]:
        """Return the upper and lower directories of the new Active snapshot KEY.

        They are read from the mounts `prepare` returned, which saves a
        second look-up of the parent chain; other shapes fall back to it.
        """
        if len(mounts) == 1:
            mount = mounts[0]
            if mount.type == "bind" and "rw" in mount.options:
                return Path(mount.source), []
            upper = mount.option_value("upperdir")
            lowers = mount.option_value("lowerdir")
            if mount.type == "overlay" and upper is not None and lowers is not None:
                # Strings, not Paths: a deep stack has hundreds of layers.
                return Path(upper), split_overlay_dirs(lowers)
        dirs = self.sn.snapshot_dirs(key)
        return dirs.fs, list(dirs.parents)

    def _committed_lowers(self, index: int) -> list[Path]:
        if index == 0:
            return []
        dirs = self.sn.snapshot_dirs(self.chain[index - 1])
        return [dirs.fs, *dirs.parents]

    def _wait_lowers(self, index: int) -> list[Path]:
        """Block until every layer below INDEX is committed; return their directories."""
        with self._committed:
            while self._committed_below < index and not self._aborted:
                self._committed.wait()
            if self._aborted:
                raise UnavailableError(
                    f"import: unpack of layer {index} stopped because another layer failed",
                    subject=self.chain[index],
                )
        return self._committed_lowers(index)

    def _mark_committed(self, index: int) -> None:
        with self._committed:
            self._committed_below = index + 1
            self._committed.notify_all()

    def _stage(self, index: int) -> _Staged:
        """Apply layer INDEX into a new staging directory."""
        layer = self.image.layers[index]
        self.progress.layer_state(index, LayerState.UNPACKING)
        holder = snapshot_dirs.make_locked_dir(staging_dir(self.sn.root))
        try:
            with self._open_layer(layer) as blob, _blob_errors(blob):
                outcome = layer_apply.apply_overlay(
                    blob,
                    holder.path,
                    lambda: self._wait_lowers(index),
                    layer=self._layer_name(layer),
                    diff_id=layer.diff_id,
                    userxattr=getattr(self.sn, "userxattr", False),
                )
                digest = blob.check()
        except BaseException:
            _remove_staging(holder)
            raise
        if outcome.waited:
            log.debug("layer=%d waited for its lower layers", index)
        return _Staged(holder.path, holder, digest, layer.media_type or outcome.media_type)

    def _unpack_parallel(self, missing: list[int], result: UnpackResult) -> None:
        # Every layer below the first missing one is committed already.
        self._mark_committed(missing[0] - 1)
        staged: dict[int, concurrent.futures.Future[_Staged]] = {}
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=self.jobs, thread_name_prefix="lamina-unpack"
        ) as pool:
            try:
                # ThreadPoolExecutor starts work in submission order, so a layer
                # waiting for its lower layers never waits for one not started.
                for index in missing:
                    staged[index] = pool.submit(self._stage, index)
                for index in missing:
                    self._commit_staged(index, staged.pop(index).result(), result)
                    self._mark_committed(index)
            except BaseException:
                with self._committed:
                    self._aborted = True
                    self._committed.notify_all()
                for future in staged.values():
                    future.cancel()
                for future in staged.values():
                    if not future.cancelled() and future.exception() is None:
                        _remove_staging(future.result().holder)
                raise

    def _commit_staged(self, index: int, staged: _Staged, result: UnpackResult) -> None:
        key = self._active_key(index)
        try:
            upper, _ = self._overlay_dirs(key, self.sn.prepare(key, self._parent(index)))
            # rename(2) replaces the empty upper directory the driver made.
            os.rename(staged.path, upper)
            staged.holder.release()
            result.layer_digests[index] = staged.digest
            result.media_types[index] = staged.media_type
            self._commit(index, key, result)
        except BaseException:
            self.progress.layer_state(index, LayerState.FAILED)
            _remove_staging(staged.holder)
            self._remove_quietly(key)
            raise
        self.progress.layer_state(index, LayerState.UNPACKED)

    # ------------------------------------------------------------ failure

    def _remove_quietly(self, key: str) -> None:
        try:
            self.sn.remove(key)
        except NotFoundError:
            pass
        except LaminaError as err:
            log.warning("import: could not remove active snapshot key=%r: %s", key, err)

    def roll_back(self, created: list[str]) -> None:
        """Remove the snapshots this import committed, unless another import uses them."""
        for chain_id in reversed(created):
            lock = self._use.get(chain_id)
            if lock is None or not lock.try_exclusive():
                log.info("import failed: keeping %s, another import uses it", short(chain_id))
                continue
            try:
                self.sn.remove(chain_id)
                delete_lock_files(lock)
            except (NotFoundError, FailedPreconditionError) as err:
                log.info("import failed: keeping %s: %s", short(chain_id), err)
            except LaminaError as err:
                log.warning("import failed: could not remove snapshot %s: %s", chain_id, err)
            finally:
                lock.release()


@contextmanager
def _blob_errors(blob: VerifyingReader) -> Iterator[None]:
    """Report a corrupt layer stream as the digest mismatch of its blob, when it is one.

    A flipped byte in a gzip blob usually breaks the stream before the
    blob's digest can be compared; the digest names the fault better.
    """
    try:
        yield
    except InvalidArgumentError as err:
        if isinstance(err, DigestMismatchError):
            raise
        try:
            blob.check()
        except DigestMismatchError as mismatch:
            raise mismatch from err
        raise


def _remove_staging(holder: snapshot_dirs.LockedDir) -> None:
    try:
        if holder.path.exists():
            snapshot_dirs.remove_tree(holder.path)
    except (OSError, LaminaError) as err:
        log.warning("could not remove staging directory path=%s: %s", holder.path, err)
    finally:
        holder.release()


def _single_bind(mounts: list[Mount]) -> bool:
    return len(mounts) == 1 and mounts[0].type == "bind" and not mounts[0].target
