"""`lamina snapshots apply`, `diff` and `unpack`: OCI layers into and out of snapshots.

On the overlay driver a layer is written straight into the snapshot's upper
directory, with its parents as lower layers and without a mount. On the
native driver the snapshot is mounted on a temporary directory and the
layer is applied there. A diff reads the overlay upper directory, or compares the native
snapshot's tree with its parent's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lamina import mount as mounting
from lamina.archive import (
    ApplyResult,
    Compression,
    DiffResult,
    apply_layer,
    apply_layer_to_upper,
    write_diff,
)
from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import FailedPreconditionError, LaminaError, NotFoundError
from lamina.snapshots.types import Kind

log = logging.getLogger(__name__)


def register_snapshot_commands(
    snapshot_commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser | None = None,
) -> None:
    """Add apply, diff and unpack to the `lamina snapshots` sub-commands."""
    parents = [common] if common is not None else []

    parser = snapshot_commands.add_parser(
        "apply",
        help="apply OCI layers to an Active snapshot",
        description="Apply layer blobs (tar, tar+gzip or tar+zstd, detected from their "
        "first bytes) in order to the Active snapshot KEY. A LAYER of - reads stdin.",
        parents=parents,
    )
    parser.add_argument("key", help="key of the Active snapshot")
    parser.add_argument("layers", nargs="+", metavar="LAYER", help="layer blob file, or -")
    parser.set_defaults(handler=apply_command)

    parser = snapshot_commands.add_parser(
        "diff",
        help="write the changes of a snapshot as an OCI layer",
        description="Write the layer that turns the parent of KEY into KEY.",
        parents=parents,
    )
    parser.add_argument("key", help="key or name of the snapshot")
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write the layer to FILE (default: standard output)"
    )
    parser.add_argument(
        "--compression",
        choices=[c.value for c in Compression],
        default=Compression.GZIP.value,
        help="compression of the layer (default: gzip)",
    )
    parser.set_defaults(handler=diff_command)

    parser = snapshot_commands.add_parser(
        "unpack",
        help="prepare, apply one layer and commit",
        description="Prepare the Active snapshot KEY on --parent, apply LAYER to it and "
        "commit it as --name (default: the layer's diff id). On failure the Active "
        "snapshot is removed.",
        parents=parents,
    )
    parser.add_argument("key", help="key of the Active snapshot to create")
    parser.add_argument("layer", metavar="LAYER", help="layer blob file, or -")
    parser.add_argument("--parent", default="", metavar="NAME", help="committed parent")
    parser.add_argument("--name", metavar="NAME", help="name of the committed snapshot")
    parser.set_defaults(handler=unpack_command)


# ---------------------------------------------------------------- helpers


def _open(args: argparse.Namespace) -> LayerSnapshotter:
    driver: str | None = getattr(args, "driver", None)
    return open_snapshotter(args.root, driver)


@contextlib.contextmanager
def _layer_file(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        with open(path, "rb") as f:
            yield f
    except FileNotFoundError as err:
        raise NotFoundError(f"open layer {path!r}: file not found", subject=path) from err


def apply_to_snapshot(sn: LayerSnapshotter, key: str, blob: BinaryIO, layer: str) -> ApplyResult:
    """Apply one layer blob to the Active snapshot KEY of SN."""
    info = sn.stat(key)
    if info.kind is not Kind.ACTIVE:
        raise FailedPreconditionError(
            f"apply to {key!r}: snapshot is {info.kind}, not Active; prepare a snapshot first",
            subject=key,
        )
    if sn.driver_name == "overlay":
        dirs = sn.snapshot_dirs(key)
        userxattr = bool(getattr(sn, "userxattr", False))
        return apply_layer_to_upper(blob, dirs.fs, dirs.parents, userxattr=userxattr, layer=layer)
    with mounting.temporary_mount(sn.mounts(key)) as target:
        return apply_layer(blob, target, layer=layer)


def diff_snapshot(
    sn: LayerSnapshotter, key: str, out: BinaryIO, compression: Compression
) -> DiffResult:
    """Write the layer of the changes of snapshot KEY against its parent."""
    dirs = sn.snapshot_dirs(key)
    if sn.driver_name == "overlay":
        userxattr = bool(getattr(sn, "userxattr", False))
        return write_diff(
            out, upper=dirs.fs, overlay_upper=True, userxattr=userxattr, compression=compression
        )
    # Native snapshots hold complete trees, the parent's included.
    lower = dirs.parents[0] if dirs.parents else None
    return write_diff(out, upper=dirs.fs, lower=lower, compression=compression)


def _print(args: argparse.Namespace, value: dict[str, object], text: str, *, err: bool) -> None:
    stream = sys.stderr if err else sys.stdout
    if getattr(args, "json", False):
        import json

        json.dump(value, stream, indent=2)
        stream.write("\n")
    else:
        print(text, file=stream)


# ---------------------------------------------------------------- handlers


def apply_command(args: argparse.Namespace) -> int:
    sn = _open(args)
    try:
        results = []
        for path in args.layers:
            with _layer_file(path) as blob:
                result = apply_to_snapshot(sn, args.key, blob, path)
            results.append({"layer": path, **dataclasses.asdict(result)})
            if not getattr(args, "json", False):
                print(f"{path}\t{result.diff_id}\t{result.size}")
        if getattr(args, "json", False):
            _print(args, {"key": args.key, "layers": results}, "", err=False)
    finally:
        sn.close()
    return 0


def diff_command(args: argparse.Namespace) -> int:
    compression = Compression.parse(args.compression)
    sn = _open(args)
    try:
        if args.output is None:
            result = diff_snapshot(sn, args.key, sys.stdout.buffer, compression)
            sys.stdout.buffer.flush()
        else:
            output = Path(args.output)
            partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
            try:
                with open(partial, "wb") as out:
                    result = diff_snapshot(sn, args.key, out, compression)
                os.replace(partial, output)
            finally:
                partial.unlink(missing_ok=True)
    finally:
        sn.close()
    value = {"key": args.key, **dataclasses.asdict(result)}
    text = f"{result.digest}\t{result.compressed_size}\tdiff id {result.diff_id}"
    # With the layer on stdout, the summary goes to stderr.
    _print(args, value, text, err=args.output is None)
    return 0


def unpack_command(args: argparse.Namespace) -> int:
    sn = _open(args)
    try:
        sn.prepare(args.key, args.parent)
        try:
            with _layer_file(args.layer) as blob:
                result = apply_to_snapshot(sn, args.key, blob, args.layer)
            name = args.name or result.diff_id
            sn.commit(name, args.key)
        except (LaminaError, OSError):
            try:
                sn.remove(args.key)
            except LaminaError as cleanup_error:
                log.warning(
                    "unpack: removing %r after the failure failed: %s",
                    args.key,
                    cleanup_error,
                    extra={"key": args.key},
                )
            raise
    finally:
        sn.close()
    value = {"name": name, "parent": args.parent, **dataclasses.asdict(result)}
    _print(args, value, f"{name}\t{result.diff_id}\t{result.size}", err=False)
    return 0
