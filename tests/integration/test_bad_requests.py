"""Malformed requests at every interface get a clear error and change nothing.

The same bad inputs go through the gRPC server (as raw protobuf messages,
including bytes that are not UTF-8), the library and the command line:
keys of 64 KiB, empty keys, oversized labels, malformed filters, unknown
update field paths. After each one the store contains exactly what it
contained before.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from lamina.drivers import LayerSnapshotter, open_snapshotter
from lamina.errors import InvalidArgumentError
from lamina.service._generated import snapshots_pb2, snapshots_pb2_grpc
from lamina.service.config import ServeConfig
from lamina.service.server import SnapshotServer
from lamina.snapshots import Info, Kind

HUGE_KEY = "k" * 64 * 1024
HUGE_LABEL = {"big": "v" * 5000}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SnapshotServer]:
    config = ServeConfig(root=tmp_path / "root", address=tmp_path / "lamina.sock")
    with SnapshotServer(config) as running:
        yield running


@pytest.fixture
def channel(server: SnapshotServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{server.address}") as opened:
        yield opened


def _listing(stub: snapshots_pb2_grpc.SnapshotsStub) -> list[tuple[str, str, int]]:
    names: list[tuple[str, str, int]] = []
    for batch in stub.List(snapshots_pb2.ListSnapshotsRequest(snapshotter="lamina")):
        names.extend((info.name, info.parent, info.kind) for info in batch.info)
    return sorted(names)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def test_grpc_bad_requests_change_nothing(channel: grpc.Channel) -> None:
    stub = snapshots_pb2_grpc.SnapshotsStub(channel)
    stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="lamina", key="base"))
    stub.Commit(snapshots_pb2.CommitSnapshotRequest(snapshotter="lamina", name="layer", key="base"))
    before = _listing(stub)

    bad_calls: dict[str, Callable[[], object]] = {
        "prepare-huge-key": lambda: stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(key=HUGE_KEY, parent="layer")
        ),
        "prepare-empty-key": lambda: stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="")),
        "prepare-huge-label": lambda: stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(key="labelled", labels=HUGE_LABEL)
        ),
        "view-huge-key": lambda: stub.View(snapshots_pb2.ViewSnapshotRequest(key=HUGE_KEY)),
        "commit-empty-name": lambda: stub.Commit(
            snapshots_pb2.CommitSnapshotRequest(name="", key="layer")
        ),
        "stat-empty-key": lambda: stub.Stat(snapshots_pb2.StatSnapshotRequest(key="")),
        "remove-huge-key": lambda: stub.Remove(snapshots_pb2.RemoveSnapshotRequest(key=HUGE_KEY)),
        "list-malformed-filter": lambda: list(
            stub.List(snapshots_pb2.ListSnapshotsRequest(filters=["labels.a=="]))
        ),
        "list-bad-regexp": lambda: list(
            stub.List(snapshots_pb2.ListSnapshotsRequest(filters=["name~=("]))
        ),
        "update-unknown-field": lambda: stub.Update(
            snapshots_pb2.UpdateSnapshotRequest(
                info=snapshots_pb2.Info(name="layer"),
                update_mask={"paths": ["parent"]},
            )
        ),
        "update-huge-label": lambda: stub.Update(
            snapshots_pb2.UpdateSnapshotRequest(
                info=snapshots_pb2.Info(name="layer", labels=HUGE_LABEL),
                update_mask={"paths": ["labels.big"]},
            )
        ),
    }
    for name, call in bad_calls.items():
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert _listing(stub) == before, name


def test_grpc_invalid_utf8_key_rejected(channel: grpc.Channel) -> None:
    stub = snapshots_pb2_grpc.SnapshotsStub(channel)
    before = _listing(stub)
    # Field 2 (key) of PrepareSnapshotRequest, length-delimited, holding
    # bytes that are not UTF-8; protobuf's Python API refuses to build it.
    raw = b"\x12\x04\xff\xfe\xfd\xfc"
    prepare = channel.unary_unary(
        "/containerd.services.snapshots.v1.Snapshots/Prepare",
        request_serializer=None,
        response_deserializer=None,
    )
    code = _code(lambda: prepare(raw))
    assert code != grpc.StatusCode.OK
    assert code != grpc.StatusCode.UNKNOWN
    assert _listing(stub) == before
    stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="still-works"))
    assert ("still-works", "", int(Kind.ACTIVE)) in _listing(stub)


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[LayerSnapshotter]:
    snapshotter = open_snapshotter(tmp_path / "root")
    snapshotter.prepare("base")
    snapshotter.commit("layer", "base")
    yield snapshotter
    snapshotter.close()


@pytest.mark.parametrize(
    "key",
    [HUGE_KEY, "", "nul\x00inside", "surrogate\udcff"],
    ids=["64KiB", "empty", "nul", "not-utf8"],
)
def test_library_bad_keys_change_nothing(sn: LayerSnapshotter, key: str) -> None:
    before = sorted(info.name for info in sn.list())
    with pytest.raises(InvalidArgumentError):
        sn.prepare(key, "layer")
    with pytest.raises(InvalidArgumentError):
        sn.view(key, "layer")
    with pytest.raises(InvalidArgumentError):
        sn.stat(key)
    with pytest.raises(InvalidArgumentError):
        sn.remove(key)
    with pytest.raises(InvalidArgumentError):
        sn.update(Info(key, Kind.COMMITTED, labels={"a": "b"}), "labels.a")
    assert sorted(info.name for info in sn.list()) == before
    assert sn.cleanup() == []


def test_cli_bad_arguments_change_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"

    def lamina(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lamina", "--root", str(root), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert lamina("snapshots", "prepare", "base").returncode == 0
    before = lamina("--json", "snapshots", "ls").stdout
    bad = [
        ("snapshots", "prepare", HUGE_KEY),
        ("snapshots", "prepare", "x", "--label", "novalue"),
        ("snapshots", "prepare", "x", "--label", "big=" + "v" * 5000),
        ("snapshots", "ls", "--filter", "kind=="),
        ("snapshots", "label", "base", "=value"),
    ]
    for args in bad:
        result = lamina(*args)
        assert result.returncode == InvalidArgumentError.exit_code, args[:3]
        assert len(result.stderr.strip().splitlines()) == 1, args[:3]
        assert "Traceback" not in result.stderr
        assert lamina("--json", "snapshots", "ls").stdout == before


def test_root_and_socket_private(server: SnapshotServer, tmp_path: Path) -> None:
    # Other users can neither list the store nor talk to the server.
    root_mode = (tmp_path / "root").stat().st_mode & 0o777
    snapshots_mode = (tmp_path / "root" / "snapshots").stat().st_mode & 0o777
    socket_mode = server.address.stat().st_mode & 0o777
    assert root_mode == 0o700
    assert snapshots_mode == 0o700
    assert socket_mode == 0o600


def test_cli_unknown_option_shows_command_usage(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root")]
    result = subprocess.run(
        [*command, "snapshots", "ls", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: lamina snapshots ls ")
    assert "lamina snapshots ls: error: unrecognized arguments: --bogus" in result.stderr


def test_cli_missing_inputs_are_named_with_a_hint(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    root = str(tmp_path / "root")
    cases = [
        (["--root", str(not_a_folder), "snapshots", "ls"], 3, "the root is not a directory"),
        (["--root", root, "images", "import", str(tmp_path / "nope.tar")], 4, "nope.tar"),
        (["--root", root, "rootfs", "prepare", "nope", "c1"], 4, "lamina images ls"),
    ]
    for args, status, text in cases:
        result = subprocess.run(
            [sys.executable, "-m", "lamina", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == status, args
        assert text in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1, args
