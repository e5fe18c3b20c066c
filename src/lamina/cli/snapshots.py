"""`lamina snapshots ...`, `lamina mount` and `lamina umount`.

Command names and aliases follow `ctr snapshots`, so that people who know
ctr find their way: ls/list, rm/remove/del/delete, mounts/m.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

from lamina import mount as mounting
from lamina.cli import archive
from lamina.cli.common import (
    human_size,
    info_json,
    mounts_json,
    open_from_args,
    parse_labels,
    print_json,
    print_table,
)
from lamina.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
)
from lamina.snapshots.types import Info, Kind, Usage


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = commands.add_parser(
        "snapshots",
        aliases=["snapshot"],
        help="manage snapshots",
        description="Create, inspect and remove snapshots, as `ctr snapshots` does.",
        parents=[common],
    )
    sub = group.add_subparsers(dest="snapshots_command", metavar="COMMAND")
    sub.required = True

    def add(
        name: str, handler: object, help_text: str, aliases: list[str] | None = None
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, aliases=aliases or [], help=help_text, parents=[common])
        parser.set_defaults(handler=handler)
        return parser

    for name, handler, help_text in (
        ("prepare", prepare, "create an Active (writable) snapshot"),
        ("view", view, "create a read-only View snapshot"),
    ):
        parser = add(name, handler, help_text)
        parser.add_argument("key", help="key of the new snapshot")
        parser.add_argument("parent", nargs="?", default="", help="committed parent (optional)")
        parser.add_argument(
            "--target", metavar="DIR", help="print the mount command for mounting at DIR"
        )
        add_label_option(parser)

    parser = add("commit", commit, "commit an Active snapshot under a name")
    parser.add_argument("name", help="name of the new Committed snapshot")
    parser.add_argument("key", help="key of the Active snapshot")
    add_label_option(parser)

    parser = add("ls", list_snapshots, "list snapshots", ["list"])
    parser.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        metavar="FILTER",
        help="containerd filter such as 'kind==committed,labels.env==prod'; "
        "repeat for alternatives",
    )

    parser = add("info", info, "print a snapshot's info as JSON")
    parser.add_argument("key")

    parser = add("usage", usage, "print disk usage of snapshots, parents excluded")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="snapshots (default: all)")
    parser.add_argument(
        "-b", "--bytes", action="store_true", help="print sizes in bytes, not human units"
    )

    parser = add("rm", remove, "remove snapshots", ["remove", "del", "delete"])
    parser.add_argument("keys", nargs="+", metavar="KEY")

    add("tree", tree, "print snapshots as a tree of parents and children")

    parser = add("mounts", print_mounts, "print the mount command of a snapshot", ["m"])
    parser.add_argument("target", help="directory the command mounts on")
    parser.add_argument("key")

    parser = add("label", label, "set labels; an empty value removes a label")
    parser.add_argument("key")
    parser.add_argument("labels", nargs="*", metavar="NAME=VALUE")

    add("cleanup", cleanup, "remove directories no snapshot owns")
    archive.register_snapshot_commands(sub, common)

    parser = commands.add_parser(
        "mount", help="mount an Active or View snapshot at a directory", parents=[common]
    )
    parser.add_argument("key", help="key of an Active or View snapshot")
    parser.add_argument("target", type=Path, metavar="DIR", help="existing directory to mount on")
    parser.set_defaults(handler=mount)

    parser = commands.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount a directory mounted by `lamina mount`",
        parents=[common],
    )
    parser.add_argument("target", type=Path, metavar="DIR", help="mount point of a snapshot")
    parser.set_defaults(handler=umount)


def add_label_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="label to set (repeatable)",
    )


# ---------------------------------------------------------------- handlers


def prepare(args: argparse.Namespace) -> int:
    return _create(args, Kind.ACTIVE)


def view(args: argparse.Namespace) -> int:
    return _create(args, Kind.VIEW)


def _create(args: argparse.Namespace, kind: Kind) -> int:
    operation = "prepare" if kind is Kind.ACTIVE else "view"
    labels = parse_labels(args.labels, operation)
    sn = open_from_args(args)
    try:
        if kind is Kind.ACTIVE:
            mounts = sn.prepare(args.key, args.parent, labels)
        else:
            mounts = sn.view(args.key, args.parent, labels)
    finally:
        sn.close()
    if args.json:
        print_json(mounts_json(mounts))
    elif args.target:
        for line in mounting.format_mount_command(mounts, args.target):
            print(line)
    return 0


def commit(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels, "commit")
    sn = open_from_args(args)
    try:
        sn.commit(args.name, args.key, labels)
    finally:
        sn.close()
    return 0


def list_snapshots(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        infos = list(sn.list(*args.filters))
    finally:
        sn.close()
    if args.json:
        print_json([info_json(i) for i in infos])
        return 0
    rows = [["KEY", "PARENT", "KIND"]]
    rows += [[i.name, i.parent, str(i.kind)] for i in sorted(infos, key=lambda i: i.name)]
    print_table(rows)
    return 0


def info(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        print_json(info_json(sn.stat(args.key)))
    finally:
        sn.close()
    return 0


def usage(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        keys = args.keys or sorted(i.name for i in sn.list())
        usages = [(key, sn.usage(key)) for key in keys]
    finally:
        sn.close()
    total = sum((u for _, u in usages), Usage())
    if args.json:
        print_json(
            {
                "snapshots": [{"key": k, "size": u.size, "inodes": u.inodes} for k, u in usages],
                "total": {"size": total.size, "inodes": total.inodes},
            }
        )
        return 0

    def size(value: int) -> str:
        return str(value) if args.bytes else human_size(value)

    rows = [["KEY", "SIZE", "INODES"]]
    rows += [[key, size(u.size), str(u.inodes)] for key, u in usages]
    rows.append(["TOTAL", size(total.size), str(total.inodes)])
    print_table(rows)
    return 0


def remove(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    status = 0
    try:
        for key in args.keys:
            try:
                sn.remove(key)
            except LaminaError as err:
                # Go on with the other keys, as `ctr snapshots rm` does, and
                # report each failure on its own line.
                print(f"lamina: error: {err}", file=sys.stderr)
                status = status or err.exit_code
    finally:
        sn.close()
    return status


def tree(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        infos = list(sn.list())
    finally:
        sn.close()
    children: dict[str, list[Info]] = defaultdict(list)
    for item in infos:
        children[item.parent].append(item)
    for siblings in children.values():
        siblings.sort(key=lambda i: i.name)
    if args.json:

        def node(item: Info) -> dict[str, object]:
            return {
                "name": item.name,
                "kind": str(item.kind),
                "children": [node(c) for c in children.get(item.name, [])],
            }

        print_json([node(r) for r in children.get("", [])])
        return 0

    # An explicit stack instead of recursion: a chain of 500 layers is normal.
    stack: list[tuple[Info, int]] = [(r, 0) for r in reversed(children.get("", []))]
    while stack:
        item, depth = stack.pop()
        prefix = "" if depth == 0 else "   " * (depth - 1) + " \\_ "
        print(f"{prefix}{item.name}")
        stack.extend((c, depth + 1) for c in reversed(children.get(item.name, [])))
    return 0


def print_mounts(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        mounts = sn.mounts(args.key)
    finally:
        sn.close()
    if args.json:
        print_json(mounts_json(mounts))
        return 0
    for line in mounting.format_mount_command(mounts, args.target):
        print(line)
    return 0


def label(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels, "label")
    sn = open_from_args(args)
    try:
        current = sn.stat(args.key)
        if labels:
            paths = [f"labels.{name}" for name in labels]
            current = sn.update(Info(args.key, current.kind, labels=labels), *paths)
    finally:
        sn.close()
    if args.json:
        print_json(dict(sorted(current.labels.items())))
    else:
        for name, value in sorted(current.labels.items()):
            print(f"{name}={value}")
    return 0


def cleanup(args: argparse.Namespace) -> int:
    sn = open_from_args(args)
    try:
        removed = sn.cleanup()
    finally:
        sn.close()
    if args.json:
        print_json({"removed": removed})
    else:
        for path in removed:
            print(f"removed {path}")
    return 0


def mount(args: argparse.Namespace) -> int:
    if not args.target.is_dir():
        raise NotFoundError(
            f"mount {args.key!r}: target directory {args.target} does not exist; create it first",
            subject=str(args.target),
        )
    sn = open_from_args(args)
    try:
        mounts = sn.mounts(args.key)
        # Two overlays on one upper directory are undefined behaviour in the
        # kernel, so an Active snapshot is mounted once at most.
        mounted = sn.mounted_at(args.key) if sn.stat(args.key).kind is Kind.ACTIVE else []
    finally:
        sn.close()
    if mounted:
        raise FailedPreconditionError(
            f"mount {args.key!r}: snapshot is already mounted at {mounted[0]}; use that "
            "mount or unmount it first",
            subject=args.key,
        )
    mounting.mount_all(mounts, args.target)
    return 0


def umount(args: argparse.Namespace) -> int:
    if not mounting.is_mountpoint(args.target):
        raise InvalidArgumentError(
            f"umount {args.target}: nothing is mounted there", subject=str(args.target)
        )
    sources = mounting.sources_of_mount(args.target)
    snapshots_dir = os.path.realpath(os.path.join(args.root, "snapshots"))
    if not any(
        os.path.commonpath([os.path.realpath(source), snapshots_dir]) == snapshots_dir
        for source in sources
    ):
        raise FailedPreconditionError(
            f"umount {args.target}: the mount there is not a snapshot of {args.root}; "
            "use umount(8) for other mounts, or pass the --root it was mounted from",
            subject=str(args.target),
        )
    mounting.unmount(args.target)
    return 0
