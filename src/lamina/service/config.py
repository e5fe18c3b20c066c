"""Settings of `lamina serve`: built-in defaults, a TOML file, the environment and flags.

Each setting is resolved from four sources; a later source overrides an
earlier one:

1. built-in defaults (`DEFAULTS`),
2. the TOML config file given by `--config` or `LAMINA_CONFIG`,
3. the environment (`LAMINA_ROOT`, `LAMINA_ADDRESS`, `LAMINA_DRIVER`,
   `LAMINA_SOCKET_GROUP`, `LAMINA_LOG_LEVEL`),
4. command-line flags.

So flags override everything, and the environment overrides the file. The
file contains top-level keys with the same names as the fields of `ServeConfig`:

    root = "/var/lib/lamina"
    address = "/run/lamina/lamina.sock"
    driver = "overlay"        # omit to use the root's own driver
    socket_group = "containerd"
    log_level = "info"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from lamina.drivers import DRIVERS
from lamina.errors import InvalidArgumentError, NotFoundError

DEFAULT_ROOT = "/var/lib/lamina"
DEFAULT_ADDRESS = "/run/lamina/lamina.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")
CONFIG_ENV = "LAMINA_CONFIG"


@dataclass(frozen=True)
class ServeConfig:
    """Resolved settings of one `lamina serve` process."""

    root: Path = Path(DEFAULT_ROOT)
    # Unix socket path; a "unix://" prefix is accepted and removed.
    address: Path = Path(DEFAULT_ADDRESS)
    # None opens an existing root with the driver it was created with, and
    # creates a new root with the default driver (overlay).
    driver: str | None = None
    # Group that may connect to the socket (mode 0660); None keeps it 0600.
    socket_group: str | None = None
    log_level: str = "info"


DEFAULTS = ServeConfig()

# Environment variable of each setting.
ENVIRONMENT: Mapping[str, str] = {
    "root": "LAMINA_ROOT",
    "address": "LAMINA_ADDRESS",
    "driver": "LAMINA_DRIVER",
    "socket_group": "LAMINA_SOCKET_GROUP",
    "log_level": "LAMINA_LOG_LEVEL",
}

_FIELD_NAMES = tuple(f.name for f in fields(ServeConfig))


def socket_path(address: str) -> Path:
    """Return the filesystem path of a unix socket address ("/p" or "unix:///p")."""
    path = address.removeprefix("unix://")
    if not path:
        raise InvalidArgumentError(
            f"invalid address {address!r}: expected a unix socket path", subject=address
        )
    return Path(path)


def _convert(name: str, value: object, source: str) -> object:
    """Check and convert one raw setting; SOURCE names where it came from in errors."""
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"invalid {name} in {source}: expected a string, got {value!r}", subject=name
        )
    if name == "root":
        if not value:
            raise InvalidArgumentError(f"invalid root in {source}: empty path", subject=name)
        return Path(value)
    if name == "address":
        return socket_path(value)
    if name == "driver" and value not in DRIVERS:
        raise InvalidArgumentError(
            f"invalid driver {value!r} in {source}: expected one of {', '.join(sorted(DRIVERS))}",
            subject=value,
        )
    if name == "log_level":
        level = value.lower()
        if level not in LOG_LEVELS:
            raise InvalidArgumentError(
                f"invalid log_level {value!r} in {source}: expected one of {', '.join(LOG_LEVELS)}",
                subject=value,
            )
        return level
    if name == "socket_group":
        # An empty group in a later source switches the group off again.
        return value or None
    return value


def _apply(config: ServeConfig, settings: Mapping[str, object], source: str) -> ServeConfig:
    changes = {name: _convert(name, value, source) for name, value in settings.items()}
    return replace(config, **changes)  # type: ignore[arg-type]


def read_file(path: Path) -> dict[str, object]:
    """Read the settings of a TOML config file, rejecting unknown keys."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise NotFoundError(f"config file {str(path)!r} not found", subject=str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgumentError(
            f"invalid config file {str(path)!r}: {err}", subject=str(path)
        ) from err

    unknown = sorted(set(data) - set(_FIELD_NAMES))
    if unknown:
        raise InvalidArgumentError(
            f"invalid config file {str(path)!r}: unknown keys {', '.join(unknown)}; "
            f"expected {', '.join(_FIELD_NAMES)}",
            subject=str(path),
        )
    return data


def read_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the settings given by environment variables, by setting name."""
    return {name: environ[var] for name, var in ENVIRONMENT.items() if var in environ}


def load_config(
    config_file: Path | None = None,
    flags: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Resolve the settings: defaults, then the file, then the environment, then FLAGS.

    CONFIG_FILE falls back to the `LAMINA_CONFIG` variable; with neither, no
    file is read. A flag whose value is None was not given.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])

    config = DEFAULTS
    if config_file is not None:
        config = _apply(config, read_file(config_file), f"config file {str(config_file)!r}")
    config = _apply(config, read_environment(environ), "the environment")
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    return _apply(config, given, "the command line")
