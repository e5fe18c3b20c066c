"""`lamina serve`: serve containerd's snapshots API on a unix socket.

Each setting is read from, in rising precedence: the built-in defaults, a
TOML file (`--config` or `LAMINA_CONFIG`), the environment (`LAMINA_ROOT`,
`LAMINA_ADDRESS`, `LAMINA_DRIVER`, `LAMINA_SOCKET_GROUP`,
`LAMINA_LOG_LEVEL`) and the flags of this command. The global options
`--root`, `--driver` and `--log-level` given before `serve` count as flags
when they differ from their defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from lamina.drivers import DRIVERS
from lamina.service.config import DEFAULT_ADDRESS, DEFAULT_ROOT, LOG_LEVELS, load_config

# Flags of this command and the setting each one sets.
_FLAG_SETTINGS = {
    "serve_root": "root",
    "serve_address": "address",
    "serve_driver": "driver",
    "serve_socket_group": "socket_group",
    "serve_log_level": "log_level",
}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser | None = None,
) -> None:
    """Add the `serve` command to SUBPARSERS."""
    parser = subparsers.add_parser(
        "serve",
        help="serve containerd's snapshots API (a proxy snapshotter) on a unix socket",
        description=(
            "Serve containerd's snapshots API on a unix socket so that containerd loads "
            "Lamina as a proxy snapshotter. Flags override the environment, which "
            "overrides the config file."
        ),
        parents=[common] if common is not None else [],
    )
    # Every default is None so that a flag overrides the file and the
    # environment only when given; the defaults live in lamina.service.config.
    parser.add_argument(
        "--config",
        dest="serve_config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML file with root, address, driver, socket_group and log_level "
        "(default: $LAMINA_CONFIG, else none)",
    )
    parser.add_argument(
        "--root",
        dest="serve_root",
        default=None,
        metavar="DIR",
        help=f"snapshot store directory (default: $LAMINA_ROOT, else {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--address",
        dest="serve_address",
        default=None,
        metavar="SOCKET",
        help=f"unix socket path to listen on (default: $LAMINA_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--driver",
        dest="serve_driver",
        default=None,
        choices=sorted(DRIVERS),
        help="snapshot driver of a new root (default: $LAMINA_DRIVER, else the root's own "
        "driver, else overlay)",
    )
    parser.add_argument(
        "--socket-group",
        dest="serve_socket_group",
        default=None,
        metavar="GROUP",
        help="group allowed to connect: the socket becomes mode 0660 instead of 0600",
    )
    parser.add_argument(
        "--log-level",
        dest="serve_log_level",
        default=None,
        type=str.lower,
        choices=LOG_LEVELS,
        help="log level; debug logs every request with its key and duration "
        "(default: $LAMINA_LOG_LEVEL, else info)",
    )
    parser.set_defaults(handler=run)


def _global_defaults() -> dict[str, str | None]:
    """Return the defaults of the global options, as lamina.cli.common computes them."""
    return {
        "root": os.environ.get("LAMINA_ROOT", DEFAULT_ROOT),
        "driver": os.environ.get("LAMINA_DRIVER") or None,
        "log_level": os.environ.get("LAMINA_LOG_LEVEL", "warning").lower(),
    }


def command_line_settings(args: argparse.Namespace) -> dict[str, str | None]:
    """Return the settings given on the command line; None for those not given."""
    flags: dict[str, str | None] = {
        setting: getattr(args, dest, None) for dest, setting in _FLAG_SETTINGS.items()
    }
    # NOTE: a global option given with exactly its default value looks the
    # same as an absent one, so it does not override the config file.
    for setting, default in _global_defaults().items():
        value = getattr(args, setting, None)
        if flags[setting] is None and value is not None and value != default:
            flags[setting] = value
    return flags


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit status."""
    from lamina.service.server import serve

    config = load_config(getattr(args, "serve_config", None), command_line_settings(args))
    _configure_logging(config.log_level)
    serve(config)
    return 0


def _configure_logging(level_name: str) -> None:
    # The command's main function may have configured the root logger for
    # another level already; the server's own level applies to Lamina's
    # loggers, whose records reach the root handler regardless of its level.
    if not logging.getLogger().handlers:
        logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger("lamina").setLevel(getattr(logging, level_name.upper()))
