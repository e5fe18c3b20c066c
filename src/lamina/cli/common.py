"""Options and helpers shared by every command of the `lamina` tool."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from lamina.drivers import DRIVERS, LayerSnapshotter, open_snapshotter
from lamina.errors import InvalidArgumentError
from lamina.snapshots.types import Info, Mount

DEFAULT_ROOT = "/var/lib/lamina"
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Add --root, --driver, --json and --log-level to PARSER.

    With SUPPRESS, an option that is not given leaves the namespace alone, so
    a copy on a sub-command never hides the value given before the command.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--root",
        default=default(os.environ.get("LAMINA_ROOT", DEFAULT_ROOT)),
        metavar="DIR",
        help=f"snapshot store directory (default: $LAMINA_ROOT, else {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--driver",
        choices=sorted(DRIVERS),
        default=default(os.environ.get("LAMINA_DRIVER") or None),
        help="snapshot driver of a new root (default: the root's own driver, else overlay)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print results as JSON",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=default(os.environ.get("LAMINA_LOG_LEVEL", "warning").lower()),
        help="log messages of this level and above to stderr (default: warning)",
    )


def open_from_args(args: argparse.Namespace) -> LayerSnapshotter:
    driver: str | None = args.driver
    return open_snapshotter(args.root, driver)


def parse_labels(pairs: Sequence[str], operation: str) -> dict[str, str]:
    """Parse NAME=VALUE arguments; VALUE may be empty."""
    labels: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidArgumentError(
                f"{operation}: invalid label {pair!r}; write labels as NAME=VALUE", subject=pair
            )
        labels[name] = value
    return labels


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, sort_keys=False)
    sys.stdout.write("\n")


def timestamp(value: datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value else ""


def info_json(info: Info) -> dict[str, Any]:
    """Return INFO in the shape `ctr snapshots info` prints."""
    result: dict[str, Any] = {"Kind": str(info.kind), "Name": info.name}
    if info.parent:
        result["Parent"] = info.parent
    if info.labels:
        result["Labels"] = dict(sorted(info.labels.items()))
    result["Created"] = timestamp(info.created)
    result["Updated"] = timestamp(info.updated)
    return result


def mounts_json(mounts: Sequence[Mount]) -> list[dict[str, Any]]:
    return [
        {"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
        for m in mounts
    ]


def plural(count: int, noun: str) -> str:
    """Return "1 layer" or "2 layers"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_size(size: float) -> str:
    """Format a byte count as du -h does, in powers of 1024."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print ROWS as columns separated by two spaces, the first row as the header."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
