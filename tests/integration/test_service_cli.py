"""`lamina serve` as a process: signals, logging, the root lock and the config file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.errors import UnavailableError
from lamina.service.client import RemoteSnapshotter

START_TIMEOUT = 20.0


class ServeProcess:
    """A `python -m lamina serve` subprocess with its output in a log file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lamina", "serve", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )

    def wait_for(self, socket: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.is_socket():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def signal(self, signum: int) -> int:
        os.kill(self.process.pid, signum)
        return self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture
def processes() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for process in started:
        process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(
    tmp_path: Path, processes: list[ServeProcess], signum: signal.Signals
) -> None:
    root, address = tmp_path / "root", tmp_path / "s.sock"
    serve = ServeProcess(tmp_path, "--root", str(root), "--address", str(address))
    processes.append(serve)
    serve.wait_for(address)
    assert stat.S_IMODE(address.stat().st_mode) == 0o600

    with RemoteSnapshotter(str(address), timeout=30) as client:
        client.prepare("default/1/key with spaces/and slashes", "")

    assert serve.signal(signum) == 0, serve.output()
    assert not address.exists()
    output = serve.output()
    assert "INFO" in output
    assert "serving containerd snapshots API" in output
    assert "stopped serving" in output


def test_debug_logs_each_request(tmp_path: Path, processes: list[ServeProcess]) -> None:
    root, address = tmp_path / "root", tmp_path / "s.sock"
    serve = ServeProcess(
        tmp_path, "--root", str(root), "--address", str(address), env={"LAMINA_LOG_LEVEL": "debug"}
    )
    processes.append(serve)
    serve.wait_for(address)
    with RemoteSnapshotter(str(address), timeout=30) as client:
        client.prepare("default/7/my key", "")
        client.stat("default/7/my key")
    assert serve.signal(signal.SIGTERM) == 0

    lines = [line for line in serve.output().splitlines() if "lamina.service.server" in line]
    prepare = [line for line in lines if "prepare key='default/7/my key'" in line]
    assert len(prepare) == 1, lines
    assert "DEBUG" in prepare[0]
    assert prepare[0].endswith(" ms")
    assert any("stat key='default/7/my key'" in line for line in lines)


def test_second_server_on_root_exits(tmp_path: Path, processes: list[ServeProcess]) -> None:
    root = tmp_path / "root"
    first = ServeProcess(tmp_path, "--root", str(root), "--address", str(tmp_path / "1.sock"))
    processes.append(first)
    first.wait_for(tmp_path / "1.sock")

    second = ServeProcess(tmp_path, "--root", str(root), "--address", str(tmp_path / "2.sock"))
    processes.append(second)
    assert second.process.wait(30) == UnavailableError.exit_code
    assert "in use by another lamina serve" in second.output()
    assert not (tmp_path / "2.sock").exists()
    assert first.process.poll() is None


def test_config_file_and_environment(tmp_path: Path, processes: list[ServeProcess]) -> None:
    file_root, env_root = tmp_path / "file-root", tmp_path / "env-root"
    address = tmp_path / "s.sock"
    config = tmp_path / "serve.toml"
    config.write_text(
        f'root = "{file_root}"\naddress = "{tmp_path / "unused.sock"}"\ndriver = "native"\n'
    )
    serve = ServeProcess(
        tmp_path,
        "--config",
        str(config),
        "--address",
        str(address),
        env={"LAMINA_ROOT": str(env_root)},
    )
    processes.append(serve)
    serve.wait_for(address)
    assert serve.signal(signal.SIGTERM) == 0
    # The environment beat the file for root, the flag beat the file for the
    # address, and the file's driver was used for the new root.
    assert (env_root / "serve.lock").exists()
    assert not file_root.exists()
    assert (env_root / "driver").read_text().strip() == "native"
