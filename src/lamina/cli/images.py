"""`lamina images ...` and `lamina rootfs prepare`.

Command names follow `ctr images` (import, ls, inspect, rm, prune, mount,
unmount). Import progress goes to stderr. On a terminal it is bars per
layer and overall (bytes, rate, time left) drawn with `rich`, elsewhere
plain log lines, and with --quiet nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from lamina import images
from lamina.cli.common import (
    human_size,
    mounts_json,
    open_from_args,
    plural,
    print_json,
    print_table,
    timestamp,
)
from lamina.errors import InvalidArgumentError
from lamina.images.progress import LayerState, LogProgress, NoProgress, Progress
from lamina.images.unpack import default_jobs

log = logging.getLogger(__name__)


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = commands.add_parser(
        "images",
        aliases=["image", "i"],
        help="import and manage container images",
        description="Import OCI and docker image archives into snapshots, as `ctr images` does.",
        parents=[common],
    )
    sub = group.add_subparsers(dest="images_command", metavar="COMMAND")
    sub.required = True

    def add(
        name: str, handler: object, help_text: str, aliases: list[str] | None = None
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, aliases=aliases or [], help=help_text, parents=[common])
        parser.set_defaults(handler=handler)
        return parser

    parser = add("import", import_command, "import an OCI layout, oci-archive or docker-archive")
    parser.add_argument(
        "archive", type=Path, help="OCI image layout folder, or an image tar (compressed or not)"
    )
    parser.add_argument("--name", help="image name (default: the name the archive records)")
    parser.add_argument(
        "--platform",
        help="OS/ARCH[/VARIANT] to pick from a multi-platform image (default: this machine's)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help=f"layers unpacked at once with the overlay driver (default: {default_jobs()})",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print no progress")

    add("ls", list_command, "list images", ["list"])

    parser = add("inspect", inspect_command, "print an image's record and layers as JSON")
    parser.add_argument("name")

    parser = add("rm", remove_command, "remove images and the snapshots only they need", ["remove"])
    parser.add_argument("names", nargs="+", metavar="NAME")

    add("prune", prune_command, "remove layer snapshots no image needs and leftovers of imports")

    parser = add("mount", mount_command, "mount an image read-only at DIR")
    parser.add_argument("name", metavar="IMAGE", help="name of an imported image")
    parser.add_argument("target", type=Path, metavar="DIR", help="directory to mount on")

    parser = add("unmount", unmount_command, "unmount an image mounted at DIR", ["umount"])
    parser.add_argument("target", type=Path, metavar="DIR", help="where the image is mounted")

    rootfs = commands.add_parser(
        "rootfs",
        help="container root filesystems on images",
        description="Create writable container root filesystems on imported images.",
        parents=[common],
    )
    rootfs_sub = rootfs.add_subparsers(dest="rootfs_command", metavar="COMMAND")
    rootfs_sub.required = True
    parser = rootfs_sub.add_parser(
        "prepare",
        help="create an Active snapshot KEY on IMAGE, optionally mounted",
        parents=[common],
    )
    parser.set_defaults(handler=prepare_command)
    parser.add_argument("image", metavar="IMAGE", help="name of an imported image")
    parser.add_argument("key", metavar="KEY", help="key of the new Active snapshot")
    parser.add_argument(
        "--mount",
        type=Path,
        metavar="DIR",
        help="mount the root filesystem here (created if missing)",
    )


# ---------------------------------------------------------------- progress display


class RichProgress:
    """Bars on a terminal: one per layer and one overall, with bytes, rate and time left."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bars

        self._bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._lock = threading.Lock()
        self._tasks: list[Any] = []
        self._names: list[str] = []
        self._overall: Any = None

    def start(self, name: str, layers: list[tuple[str, int]]) -> None:
        self._bars.start()
        self._overall = self._bars.add_task(f"{name} total", total=sum(s for _, s in layers))
        for index, (layer, size) in enumerate(layers):
            label = layer.removeprefix("sha256:")[:12]
            self._names.append(label)
            self._tasks.append(
                self._bars.add_task(f"  {index + 1:>3} {label} waiting", total=size or 1)
            )

    def layer_state(self, index: int, state: LayerState) -> None:
        task = self._tasks[index]
        description = f"  {index + 1:>3} {self._names[index]} {state.value}"
        with self._lock:
            if state is LayerState.REUSED:
                size = self._bars.tasks[task].total or 0
                self._bars.update(task, completed=size, description=description)
                self._bars.advance(self._overall, size)
            else:
                self._bars.update(task, description=description)

    def layer_bytes(self, index: int, count: int) -> None:
        with self._lock:
            self._bars.advance(self._tasks[index], count)
            self._bars.advance(self._overall, count)

    def finish(self, ok: bool) -> None:
        self._bars.stop()


def _progress(args: argparse.Namespace) -> Progress:
    if args.quiet or args.json:
        return NoProgress()
    if sys.stderr.isatty():
        return RichProgress()
    # Not a terminal: plain lines, whatever the --log-level option.
    logger = logging.getLogger("lamina.import")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return LogProgress(logger)


# ---------------------------------------------------------------- commands


def import_command(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise InvalidArgumentError(
            f"images import: --jobs must be 1 or more, not {args.jobs}", subject=str(args.jobs)
        )
    platform = images.Platform.parse(args.platform) if args.platform else None
    sn = open_from_args(args)
    try:
        result = images.import_image(
            sn,
            args.archive,
            name=args.name,
            platform=platform,
            jobs=args.jobs,
            progress=_progress(args),
        )
    finally:
        sn.close()
    if args.json:
        print_json(result.to_json())
    elif not args.quiet:
        print(
            f"imported {result.image.name} ({result.image.manifest_digest}): "
            f"{plural(len(result.created), 'layer')} unpacked, {len(result.reused)} reused, "
            f"in {result.seconds:.2f} s"
        )
    return 0


def list_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        records = images.list_images(sn)
    finally:
        sn.close()
    if args.json:
        print_json([record.to_json() for record in records])
        return 0
    rows = [["NAME", "PLATFORM", "SIZE", "MANIFEST", "CREATED"]]
    rows += [
        [
            record.name,
            record.platform,
            human_size(record.size),
            record.manifest_digest,
            timestamp(record.created),
        ]
        for record in records
    ]
    print_table(rows)
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        print_json(images.inspect_image(sn, args.name))
    finally:
        sn.close()
    return 0


def remove_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    removed: dict[str, list[str]] = {}
    layer_counts: dict[str, int] = {}
    try:
        for name in args.names:
            layer_counts[name] = len(images.get_image(sn, name, "images rm").diff_ids)
            removed[name] = images.remove_image(sn, name)
    finally:
        sn.close()
    if args.json:
        print_json([{"name": n, "removed_snapshots": s} for n, s in removed.items()])
    else:
        for name, snapshots in removed.items():
            line = f"{name}: removed, with {len(snapshots)} of its {layer_counts[name]} layers"
            still_used = layer_counts[name] - len(snapshots)
            if still_used:
                line += f"; {still_used} stay while a container or another image uses them"
            print(line)
    return 0


def prune_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        removed = images.prune_images(sn)
    finally:
        sn.close()
    if args.json:
        print_json({"removed": removed})
    elif not removed:
        print("nothing to prune")
    else:
        for item in removed:
            print(item)
    return 0


def mount_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        key = images.mount_image(sn, args.name, args.target)
    finally:
        sn.close()
    if args.json:
        print_json({"image": args.name, "target": str(args.target), "key": key})
    else:
        print(f"{args.target}: {args.name} mounted read-only")
    return 0


def unmount_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        images.unmount_image(sn, args.target)
    finally:
        sn.close()
    if not args.json:
        print(f"{args.target}: unmounted")
    return 0


def prepare_command(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        mounts = images.prepare_rootfs(sn, args.image, args.key, mount=args.mount)
    finally:
        sn.close()
    if args.json:
        print_json({"key": args.key, "image": args.image, "mounts": mounts_json(mounts)})
    elif args.mount is not None:
        print(f"{args.mount}: root filesystem {args.key!r} of {args.image} mounted")
    else:
        from lamina.mount import format_mount_command

        print(" ".join(format_mount_command(mounts, "TARGET")))
    return 0
