"""The `lamina` command: argument parsing, logging set-up and error reporting.

Each command group lives in its own module with a `register` function that
adds its sub-commands. A command handler takes the parsed arguments and
returns the exit status. Errors reach the user as one line on stderr and the
exit status of their class (lamina.errors.CODES), with a traceback only under
`--log-level debug`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from lamina import __version__
from lamina.cli import fsck, images, serve, snapshots
from lamina.cli.common import DEFAULT_ROOT, add_global_options
from lamina.errors import LaminaError

log = logging.getLogger("lamina.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lamina",
        description="Lamina: copy-on-write snapshots of container filesystems.",
        epilog=f"The store lives in --root (default $LAMINA_ROOT, else {DEFAULT_ROOT}).",
    )
    parser.add_argument("--version", action="version", version=f"lamina {__version__}")
    add_global_options(parser, suppress=False)
    # Leaf commands accept the same options after the command name too; those
    # copies default to "absent" so they never hide a value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, suppress=True)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    snapshots.register(commands, common)
    images.register(commands, common)
    fsck.register(commands, common)
    serve.register(commands)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Record in each command's defaults its own parser, for errors argparse reports late."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _remember_parsers(command)


def configure_logging(level_name: str) -> None:
    level = getattr(logging, level_name.upper(), None)
    if not isinstance(level, int):
        level = logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like Ctrl-C so that every cleanup step runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # parse_args would print the top-level usage; the command's own is the useful one.
        command_parser: argparse.ArgumentParser = getattr(args, "command_parser", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(args.log_level)
    debug = args.log_level.lower() == "debug"
    # The server installs its own handlers to drain requests in flight.
    if args.command != "serve" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status: int = args.handler(args)
        return status
    except LaminaError as err:
        if debug:
            log.exception("%s failed", args.command)
        print(f"lamina: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # The reader of the output went away (`lamina snapshots ls | head`).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        if debug:
            log.exception("%s failed", args.command)
        where = f" {err.filename}:" if err.filename else ""
        print(f"lamina: error:{where} {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lamina: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("lamina: terminated", file=sys.stderr)
        return 143
