"""The gRPC server of containerd's snapshots API, called as containerd calls it.

Requests go over a real unix socket to an in-process `SnapshotServer` on a
real store under tmp_path, either through `RemoteSnapshotter` or through the
raw generated stub (to check status codes, metadata and streamed batches
exactly as containerd receives them).
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from lamina.drivers import open_snapshotter
from lamina.errors import (
    CODES,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
    UnavailableError,
)
from lamina.service._generated import snapshots_pb2, snapshots_pb2_grpc
from lamina.service.client import RemoteSnapshotter
from lamina.service.config import ServeConfig
from lamina.service.server import LIST_BATCH_SIZE, SnapshotServer
from lamina.snapshots import Info, Kind, Mount, Snapshotter, Usage

# A key as containerd sends it to a proxy snapshotter: namespace, a
# sequence number, then the client's key, which may hold spaces and slashes.
CONTAINERD_KEY = "default/42/extract-123 sha256:abc/with spaces"


@pytest.fixture
def config(tmp_path: Path) -> ServeConfig:
    return ServeConfig(root=tmp_path / "root", address=tmp_path / "lamina.sock")


@pytest.fixture
def server(config: ServeConfig) -> Iterator[SnapshotServer]:
    with SnapshotServer(config) as running:
        yield running


@pytest.fixture
def client(server: SnapshotServer) -> Iterator[RemoteSnapshotter]:
    with RemoteSnapshotter(str(server.address), timeout=30) as remote:
        yield remote


@pytest.fixture
def stub(server: SnapshotServer) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    with grpc.insecure_channel(f"unix://{server.address}") as channel:
        yield snapshots_pb2_grpc.SnapshotsStub(channel)


def _status(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


# -- requests as containerd sends them -----------------------------------------


def test_containerd_keys_without_namespace_header(
    stub: snapshots_pb2_grpc.SnapshotsStub,
) -> None:
    # No metadata at all, as containerd's garbage collector sends. The
    # snapshotter field contains the proxy plugin's name, whatever it is.
    response = stub.Prepare(
        snapshots_pb2.PrepareSnapshotRequest(
            snapshotter="any-proxy-name",
            key=CONTAINERD_KEY,
            labels={"containerd.io/snapshot.ref": "x"},
        )
    )
    assert len(response.mounts) == 1
    assert response.mounts[0].type == "bind"

    stat_response = stub.Stat(snapshots_pb2.StatSnapshotRequest(key=CONTAINERD_KEY))
    assert stat_response.info.name == CONTAINERD_KEY
    assert stat_response.info.kind == snapshots_pb2.ACTIVE
    assert stat_response.info.labels["containerd.io/snapshot.ref"] == "x"
    assert stat_response.info.HasField("created_at")

    stub.Commit(
        snapshots_pb2.CommitSnapshotRequest(
            snapshotter="other", name="default/43/sha256:layer one", key=CONTAINERD_KEY
        )
    )
    committed = stub.Stat(snapshots_pb2.StatSnapshotRequest(key="default/43/sha256:layer one"))
    assert committed.info.kind == snapshots_pb2.COMMITTED


def test_mounts_carry_every_field(client: RemoteSnapshotter) -> None:
    client.prepare("base", "")
    client.commit("layer-1", "base")
    mounts = client.prepare("top", "layer-1")

    assert len(mounts) == 1
    mount = mounts[0]
    assert isinstance(mount, Mount)
    assert mount.type == "overlay"
    assert mount.option_value("lowerdir") is not None
    assert mount.option_value("upperdir") is not None
    assert client.mounts("top") == mounts


def test_commit_with_same_parent_accepted(stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
    stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="base"))
    stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="layer-1", key="base"))
    stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="next", parent="layer-1"))
    # containerd 2.x fills field 5 (parent); the same parent is no rebase.
    stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="layer-2", key="next", parent="layer-1"))
    info = stub.Stat(snapshots_pb2.StatSnapshotRequest(key="layer-2")).info
    assert info.parent == "layer-1"


def test_commit_rebase_unimplemented(stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
    stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="base"))
    stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="layer-1", key="base"))
    stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="next"))
    code = _status(
        lambda: stub.Commit(
            snapshots_pb2.CommitSnapshotRequest(name="layer-2", key="next", parent="layer-1")
        )
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED
    # The active snapshot is untouched and can still be committed.
    stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="layer-2", key="next"))


def test_list_streams_batches(stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
    count = 2 * LIST_BATCH_SIZE + 7
    for i in range(count):
        stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key=f"ns/{i}/key {i}"))

    batches = list(stub.List(snapshots_pb2.ListSnapshotsRequest(snapshotter="lamina")))

    assert [len(b.info) for b in batches] == [LIST_BATCH_SIZE, LIST_BATCH_SIZE, 7]
    names = {info.name for batch in batches for info in batch.info}
    assert names == {f"ns/{i}/key {i}" for i in range(count)}


def test_list_filters_and_errors(client: RemoteSnapshotter) -> None:
    client.prepare("a", "", labels={"containerd.io/gc.root": "yes"})
    client.prepare("b", "")
    assert {i.name for i in client.list('labels."containerd.io/gc.root"==yes')} == {"a"}
    with pytest.raises(InvalidArgumentError):
        list(client.list("name=="))


def test_update_field_mask(client: RemoteSnapshotter) -> None:
    client.prepare("k", "", labels={"a": "1", "b": "2"})
    updated = client.update(
        Info(name="k", kind=Kind.ACTIVE, labels={"a": "9", "c": "3"}), "labels.a"
    )
    assert dict(updated.labels) == {"a": "9", "b": "2"}
    assert client.stat("k") == updated
    with pytest.raises(InvalidArgumentError):
        client.update(Info(name="k", kind=Kind.ACTIVE), "parent")


def test_usage_and_cleanup(client: RemoteSnapshotter) -> None:
    mounts = client.prepare("k", "")
    source = Path(mounts[0].source)
    (source / "data").write_bytes(b"x" * 10000)
    usage = client.usage("k")
    assert usage.size >= 10000
    assert usage.inodes >= 1
    assert client.cleanup() == []


# -- errors --------------------------------------------------------------------


def test_errors_from_real_operations(client: RemoteSnapshotter) -> None:
    with pytest.raises(NotFoundError):
        client.stat("missing")
    client.prepare("k", "")
    with pytest.raises(AlreadyExistsError):
        client.prepare("k", "")
    client.commit("layer", "k")
    client.prepare("child", "layer")
    with pytest.raises(FailedPreconditionError):
        client.remove("layer")
    with pytest.raises(FailedPreconditionError):
        client.commit("again", "layer")
    with pytest.raises(InvalidArgumentError):
        client.prepare("", "")


class RaisingSnapshotter:
    """A snapshotter whose stat raises a given error, to check every row of the table."""

    def __init__(self, error: LaminaError) -> None:
        self.error = error
        self.closed = False

    def stat(self, key: str) -> Info:
        raise self.error

    def cleanup(self) -> list[str]:
        raise RuntimeError("disk on fire")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("row", CODES, ids=[row.grpc_code for row in CODES])
def test_error_table_round_trip(config: ServeConfig, row: object) -> None:
    error_class = row.error_class  # type: ignore[attr-defined]
    error = error_class(f"stat 'k': {row.grpc_code}", subject="k")  # type: ignore[attr-defined]
    fake = RaisingSnapshotter(error)

    def open_fake(root: Path, driver: str | None) -> Snapshotter:
        return fake  # type: ignore[return-value]

    with (
        SnapshotServer(config, open_snapshotter=open_fake) as server,
        grpc.insecure_channel(f"unix://{server.address}") as channel,
    ):
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        code = _status(lambda: stub.Stat(snapshots_pb2.StatSnapshotRequest(key="k")))
        assert code.name == error_class.grpc_code
        with RemoteSnapshotter(str(server.address)) as remote, pytest.raises(LaminaError) as caught:
            remote.stat("k")
        assert type(caught.value) is error_class
        assert caught.value.subject == "k"
    assert fake.closed


def test_unexpected_exception_is_internal(config: ServeConfig) -> None:
    fake = RaisingSnapshotter(NotFoundError("unused"))
    with SnapshotServer(config, open_snapshotter=lambda root, driver: fake) as server:  # type: ignore[arg-type,return-value]
        with grpc.insecure_channel(f"unix://{server.address}") as channel:
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            code = _status(lambda: stub.Cleanup(snapshots_pb2.CleanupRequest()))
        assert code == grpc.StatusCode.INTERNAL
        # The server carries on after the failure.
        with RemoteSnapshotter(str(server.address)) as remote, pytest.raises(NotFoundError):
            remote.stat("k")


# -- threads ---------------------------------------------------------------------


def test_concurrent_requests(client: RemoteSnapshotter) -> None:
    def cycle(worker: int) -> None:
        for i in range(15):
            key = f"default/{worker}/active {i}"
            client.prepare(key, "")
            client.commit(f"default/{worker}/layer {i}", key)
            client.remove(f"default/{worker}/layer {i}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(cycle, w) for w in range(8)]:
            future.result()
    assert list(client.list()) == []


class BlockingSnapshotter:
    """Wraps a snapshotter; `usage` waits for `release` so a request stays in flight."""

    def __init__(self, inner: Snapshotter) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed_while_busy = False
        self.busy = False

    def usage(self, key: str) -> Usage:
        self.busy = True
        self.entered.set()
        self.release.wait(30)
        result = self.inner.usage(key)
        self.busy = False
        return result

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self.inner.prepare(key, parent, labels)

    def close(self) -> None:
        self.closed_while_busy = self.busy
        self.inner.close()


def test_stop_finishes_requests_in_flight(config: ServeConfig) -> None:
    holder: list[BlockingSnapshotter] = []

    def open_blocking(root: Path, driver: str | None) -> Snapshotter:
        holder.append(BlockingSnapshotter(open_snapshotter(root, driver)))
        return holder[0]  # type: ignore[return-value]

    server = SnapshotServer(config, open_snapshotter=open_blocking)
    server.start()
    remote = RemoteSnapshotter(str(server.address), timeout=30)
    remote.prepare("k", "")
    blocking = holder[0]

    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(remote.usage, "k")
        assert blocking.entered.wait(10)
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 20})
        stopper.start()
        # stop() has begun while the request is still blocked in usage().
        threading.Timer(0.5, blocking.release.set).start()
        usage = in_flight.result(timeout=30)
        stopper.join(30)

    assert not stopper.is_alive()
    assert usage.inodes == 1
    assert not blocking.closed_while_busy
    assert not config.address.exists()
    remote.close()


# -- socket and lock -------------------------------------------------------------


def test_socket_mode_owner_only(server: SnapshotServer) -> None:
    mode = server.address.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_socket_group_widens_mode(tmp_path: Path) -> None:
    group = grp.getgrgid(1)
    config = ServeConfig(
        root=tmp_path / "root", address=tmp_path / "s.sock", socket_group=group.gr_name
    )
    with SnapshotServer(config) as server:
        status = server.address.stat()
        assert stat.S_IMODE(status.st_mode) == 0o660
        assert status.st_gid == group.gr_gid


def test_unknown_socket_group_rejected(tmp_path: Path) -> None:
    config = ServeConfig(
        root=tmp_path / "root", address=tmp_path / "s.sock", socket_group="no-such-group-xyz"
    )
    with pytest.raises(InvalidArgumentError):
        SnapshotServer(config).start()
    assert not config.address.exists()


def test_stale_socket_replaced(config: ServeConfig) -> None:
    config.address.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(config.address))
    stale.close()
    assert config.address.is_socket()

    with SnapshotServer(config) as server, RemoteSnapshotter(str(server.address)) as remote:
        remote.prepare("k", "")
        assert remote.stat("k").kind is Kind.ACTIVE


def test_live_socket_not_replaced(tmp_path: Path, server: SnapshotServer) -> None:
    other = ServeConfig(root=tmp_path / "other-root", address=server.address)
    with pytest.raises(UnavailableError):
        SnapshotServer(other).start()
    # The running server still replies, and the failed start released its
    # lock on the other root.
    with RemoteSnapshotter(str(server.address)) as remote, pytest.raises(NotFoundError):
        remote.stat("k")
    with SnapshotServer(ServeConfig(root=other.root, address=tmp_path / "third.sock")):
        pass


def test_regular_file_at_address_kept(config: ServeConfig) -> None:
    config.address.parent.mkdir(parents=True, exist_ok=True)
    config.address.write_text("not a socket")
    with pytest.raises(FailedPreconditionError):
        SnapshotServer(config).start()
    assert config.address.read_text() == "not a socket"


def test_second_server_on_root_refused(server: SnapshotServer, tmp_path: Path) -> None:
    second = ServeConfig(root=server.config.root, address=tmp_path / "second.sock")
    with pytest.raises(UnavailableError) as caught:
        SnapshotServer(second).start()
    assert caught.value.subject == str(server.config.root)
    assert not second.address.exists()
    # The first server's lock file names its pid.
    assert (server.config.root / "serve.lock").read_text().strip() == str(os.getpid())


def test_restart_keeps_state(config: ServeConfig) -> None:
    with SnapshotServer(config) as server, RemoteSnapshotter(str(server.address)) as remote:
        remote.prepare("k", "", labels={"l": "1"})
        before = remote.stat("k")
    assert not config.address.exists()
    with SnapshotServer(config) as server, RemoteSnapshotter(str(server.address)) as remote:
        assert remote.stat("k") == before
