"""Settings of `lamina serve`: defaults, then the TOML file, then the environment, then flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lamina.cli import build_parser
from lamina.cli.serve import command_line_settings
from lamina.errors import InvalidArgumentError, NotFoundError
from lamina.service.config import DEFAULTS, ServeConfig, load_config, socket_path

FILE_TEXT = """\
root = "/srv/file-root"
address = "/run/file.sock"
driver = "native"
socket_group = "file-group"
log_level = "warning"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(FILE_TEXT)
    return path


def test_defaults_without_sources() -> None:
    assert load_config(None, {}, environ={}) == DEFAULTS
    assert DEFAULTS.driver is None
    assert DEFAULTS.socket_group is None
    assert DEFAULTS.log_level == "info"


def test_file_overrides_defaults(config_file: Path) -> None:
    config = load_config(config_file, {}, environ={})
    assert config == ServeConfig(
        root=Path("/srv/file-root"),
        address=Path("/run/file.sock"),
        driver="native",
        socket_group="file-group",
        log_level="warning",
    )


def test_environment_overrides_file(config_file: Path) -> None:
    environ = {"LAMINA_ROOT": "/env-root", "LAMINA_LOG_LEVEL": "DEBUG", "LAMINA_SOCKET_GROUP": ""}
    config = load_config(config_file, {}, environ=environ)
    assert config.root == Path("/env-root")
    assert config.log_level == "debug"
    # An empty value in a later source switches the group off.
    assert config.socket_group is None
    assert config.address == Path("/run/file.sock")
    assert config.driver == "native"


def test_flags_override_environment(config_file: Path) -> None:
    environ = {"LAMINA_ROOT": "/env-root", "LAMINA_ADDRESS": "/env.sock"}
    flags = {"root": "/flag-root", "address": None, "driver": "overlay"}
    config = load_config(config_file, flags, environ=environ)
    assert config.root == Path("/flag-root")
    assert config.address == Path("/env.sock")
    assert config.driver == "overlay"


def test_config_file_from_environment(config_file: Path) -> None:
    config = load_config(None, {}, environ={"LAMINA_CONFIG": str(config_file)})
    assert config.root == Path("/srv/file-root")


def test_unix_address_prefix_removed() -> None:
    assert socket_path("unix:///run/x.sock") == Path("/run/x.sock")
    config = load_config(None, {"address": "unix:///run/y.sock"}, environ={})
    assert config.address == Path("/run/y.sock")


@pytest.mark.parametrize(
    "text",
    [
        'rooot = "/typo"\n',
        'driver = "zfs"\n',
        'log_level = "loud"\n',
        "root = 5\n",
        'root = ""\n',
        'address = "unix://"\n',
        "root = [\n",
    ],
    ids=[
        "unknown-key",
        "bad-driver",
        "bad-level",
        "not-string",
        "empty-root",
        "empty-address",
        "bad-toml",
    ],
)
def test_invalid_file_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError):
        load_config(path, {}, environ={})


def test_invalid_environment_rejected() -> None:
    with pytest.raises(InvalidArgumentError):
        load_config(None, {}, environ={"LAMINA_DRIVER": "btrfs-maybe"})


def test_missing_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_config(tmp_path / "absent.toml", {}, environ={})


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_serve_flags_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LAMINA_ROOT", "LAMINA_DRIVER", "LAMINA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    args = _parse(
        [
            "serve",
            "--root",
            "/r",
            "--address",
            "/a.sock",
            "--driver",
            "native",
            "--socket-group",
            "g",
        ]
    )
    assert command_line_settings(args) == {
        "root": "/r",
        "address": "/a.sock",
        "driver": "native",
        "socket_group": "g",
        "log_level": None,
    }


def test_global_options_count_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LAMINA_ROOT", "LAMINA_DRIVER", "LAMINA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    given = command_line_settings(_parse(["--root", "/g", "--log-level", "debug", "serve"]))
    assert given["root"] == "/g"
    assert given["log_level"] == "debug"
    absent = command_line_settings(_parse(["serve"]))
    assert absent == dict.fromkeys(absent)
    # The option after the command wins over the one before it.
    both = command_line_settings(_parse(["--root", "/g", "serve", "--root", "/s"]))
    assert both["root"] == "/s"
