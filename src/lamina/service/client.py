"""A `Snapshotter` that calls a snapshots API server over gRPC.

`RemoteSnapshotter` speaks containerd's `containerd.services.snapshots.v1`
API, so it works against `lamina serve` and against containerd itself
(whose socket serves the same service for its built-in snapshotters,
chosen by the `snapshotter` field). gRPC status codes come back as the
`lamina.errors` class of the same code.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

import grpc

from lamina.errors import LaminaError, error_class_for_grpc_code
from lamina.service._generated import snapshots_pb2, snapshots_pb2_grpc
from lamina.service.config import socket_path
from lamina.service.convert import info_from_proto, info_to_proto, mount_from_proto
from lamina.snapshots.types import Info, Mount, Usage

T = TypeVar("T")

# containerd reads the namespace and the lease of a request from these
# metadata keys. Keys sent to a proxy snapshotter already carry the
# namespace, so the headers only matter when talking to containerd's own
# socket, where a snapshot outside any lease and without a
# containerd.io/gc.root label may be garbage-collected at any time.
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"


def error_from_rpc(error: grpc.RpcError, operation: str, subject: str) -> LaminaError:
    """Return the LaminaError of the status code of a failed call."""
    code: grpc.StatusCode = error.code()
    details: str | None = error.details()
    error_class = error_class_for_grpc_code(code.name)
    message = details or f"{operation} {subject!r}: {code.name}"
    return error_class(message, subject=subject)


class RemoteSnapshotter:
    """A Snapshotter whose operations are calls to a snapshots API server."""

    def __init__(
        self,
        address: str,
        snapshotter: str = "lamina",
        namespace: str | None = None,
        timeout: float | None = None,
        lease: str | None = None,
    ) -> None:
        """Connect lazily to the unix socket ADDRESS ("/path" or "unix:///path").

        SNAPSHOTTER is sent in every request; `lamina serve` ignores it, and
        containerd's own socket uses it to pick a snapshotter. NAMESPACE and
        LEASE, when given, are sent as containerd's namespace and lease
        headers. TIMEOUT is the deadline of each call in seconds; None waits
        without limit.
        """
        self.address = str(socket_path(address))
        self.snapshotter = snapshotter
        self._timeout = timeout
        headers = ((NAMESPACE_HEADER, namespace), (LEASE_HEADER, lease))
        self._metadata = tuple((name, value) for name, value in headers if value)
        self._channel = grpc.insecure_channel(f"unix:{self.address}")
        self._stub = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    def _call(self, operation: str, subject: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as err:
            raise error_from_rpc(err, operation, subject) from err

    def stat(self, key: str) -> Info:
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=key)
        response = self._call(
            "stat",
            key,
            lambda: self._stub.Stat(request, timeout=self._timeout, metadata=self._metadata),
        )
        return info_from_proto(response.info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        request = snapshots_pb2.UpdateSnapshotRequest(
            snapshotter=self.snapshotter, info=info_to_proto(info)
        )
        request.update_mask.paths.extend(fieldpaths)
        response = self._call(
            "update",
            info.name,
            lambda: self._stub.Update(request, timeout=self._timeout, metadata=self._metadata),
        )
        return info_from_proto(response.info)

    def usage(self, key: str) -> Usage:
        request = snapshots_pb2.UsageRequest(snapshotter=self.snapshotter, key=key)
        response = self._call(
            "usage",
            key,
            lambda: self._stub.Usage(request, timeout=self._timeout, metadata=self._metadata),
        )
        return Usage(size=response.size, inodes=response.inodes)

    def mounts(self, key: str) -> list[Mount]:
        request = snapshots_pb2.MountsRequest(snapshotter=self.snapshotter, key=key)
        response = self._call(
            "mounts",
            key,
            lambda: self._stub.Mounts(request, timeout=self._timeout, metadata=self._metadata),
        )
        return [mount_from_proto(m) for m in response.mounts]

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        response = self._call(
            "prepare",
            key,
            lambda: self._stub.Prepare(request, timeout=self._timeout, metadata=self._metadata),
        )
        return [mount_from_proto(m) for m in response.mounts]

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        request = snapshots_pb2.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=dict(labels or {})
        )
        response = self._call(
            "view",
            key,
            lambda: self._stub.View(request, timeout=self._timeout, metadata=self._metadata),
        )
        return [mount_from_proto(m) for m in response.mounts]

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {})
        )
        self._call(
            "commit",
            key,
            lambda: self._stub.Commit(request, timeout=self._timeout, metadata=self._metadata),
        )

    def remove(self, key: str) -> None:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
        self._call(
            "remove",
            key,
            lambda: self._stub.Remove(request, timeout=self._timeout, metadata=self._metadata),
        )

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        for info in self.list(*filters):
            fn(info)

    def list(self, *filters: str) -> Iterator[Info]:
        request = snapshots_pb2.ListSnapshotsRequest(
            snapshotter=self.snapshotter, filters=list(filters)
        )
        subject = " ".join(filters)
        stream = self._call(
            "list",
            subject,
            lambda: self._stub.List(request, timeout=self._timeout, metadata=self._metadata),
        )
        # Errors of a server-streamed call surface while reading the stream.
        responses = iter(stream)
        while True:
            response = self._call("list", subject, lambda: next(responses, None))
            if response is None:
                return
            for message in response.info:
                yield info_from_proto(message)

    def cleanup(self) -> builtins.list[str]:
        """Ask the server to remove unused directories.

        The API returns no list of what was removed, so this returns [].
        """
        request = snapshots_pb2.CleanupRequest(snapshotter=self.snapshotter)
        self._call(
            "cleanup",
            "",
            lambda: self._stub.Cleanup(request, timeout=self._timeout, metadata=self._metadata),
        )
        return []

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteSnapshotter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
