"""The layer applier as the importer uses it: overlay fast path, generic path, deferred lowers.

`apply_overlay` fills an overlay upper directory, `apply_generic` a mounted
tree; both are lamina.archive's appliers and verify the diff id.

The overlay applier reads lower layers in two cases only: for a parent
directory the tar does not list (its owner, mode and xattrs are copied up)
and for the target of a hard link outside the layer (the file is copied
up). When the lower layers are still being unpacked, `apply_overlay` takes
a `wait_lowers` function instead of the lower directories: the applier
runs without lower layers until its first lookup in one, then calls
`wait_lowers`, which blocks until every lower layer is complete and
returns their directories, and goes on with them. The result is the one a
sequential unpack gives, and a layer that never looks below itself never
waits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from lamina.archive.apply import ApplyResult, _apply, apply_layer, apply_layer_to_upper
from lamina.archive.errors import LayerDigestError
from lamina.archive.overlay import UpperTree
from lamina.images.errors import DigestMismatchError

# Media types recorded for docker-archive layers, by detected compression.
_MEDIA_TYPES = {
    "none": "application/vnd.docker.image.rootfs.diff.tar",
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class Outcome:
    """The result of one apply, and whether it waited for its lower layers."""

    result: ApplyResult
    waited: bool

    @property
    def media_type(self) -> str:
        return docker_layer_type(self.result.compression)


def docker_layer_type(compression: str) -> str:
    """Return the layer media type a docker-archive layer with COMPRESSION gets."""
    return _MEDIA_TYPES.get(compression, "")


# A layer directory, as a path string (from a mount's options) or a Path.
LayerDir = str | os.PathLike[str]


class _DeferredLowersTree(UpperTree):
    """An upper directory whose lower layers are fetched at the first lookup in them."""

    def __init__(
        self,
        upper: Path,
        wait_lowers: Callable[[], Sequence[LayerDir]],
        *,
        userxattr: bool,
        layer: str,
    ) -> None:
        super().__init__(upper, [], userxattr=userxattr, layer=layer)
        self._wait_lowers: Callable[[], Sequence[LayerDir]] | None = wait_lowers
        self.waited = False

    def lower_entry(self, key: tuple[str, ...]) -> tuple[str, os.stat_result] | None:
        # Every lookup in a lower layer goes through lower_entry (parent
        # directories in missing_dir, hard link targets in copy_up).
        if self._wait_lowers is not None:
            self.lowers = [os.fspath(path) for path in self._wait_lowers()]
            self._wait_lowers = None
            self.waited = True
        return super().lower_entry(key)


def _mismatch(err: LayerDigestError, diff_id: str) -> DigestMismatchError:
    return DigestMismatchError(
        f"layer {err.layer}: uncompressed content hashes to {err.actual}, but the image config "
        f"lists diff id {diff_id}; the archive is corrupt",
        subject=err.layer,
    )


def apply_overlay(
    blob: io.RawIOBase,
    upper: Path,
    lowers: Sequence[LayerDir] | Callable[[], Sequence[LayerDir]],
    *,
    layer: str,
    diff_id: str,
    userxattr: bool,
) -> Outcome:
    """Apply the layer BLOB into the overlay upper directory UPPER.

    LOWERS are the lower directories, nearest first, or a function that
    waits for them and returns them (see the module documentation).
    """
    stream = cast(BinaryIO, blob)
    try:
        if not callable(lowers):
            result = apply_layer_to_upper(
                stream,
                upper,
                lowers,
                userxattr=userxattr,
                layer=layer,
                expected_diff_id=diff_id,
            )
            return Outcome(result, waited=False)
        tree = _DeferredLowersTree(upper, lowers, userxattr=userxattr, layer=layer)
        # NOTE: lamina.archive.apply has no public entry point taking a
        # prepared tree; _apply is the one apply_layer_to_upper uses.
        result = _apply(stream, tree, layer, diff_id)
        return Outcome(result, waited=tree.waited)
    except LayerDigestError as err:
        raise _mismatch(err, diff_id) from err


def apply_generic(blob: io.RawIOBase, target: Path, *, layer: str, diff_id: str) -> Outcome:
    """Apply the layer BLOB to the mounted tree TARGET."""
    try:
        result = apply_layer(cast(BinaryIO, blob), target, layer=layer, expected_diff_id=diff_id)
    except LayerDigestError as err:
        raise _mismatch(err, diff_id) from err
    return Outcome(result, waited=False)
