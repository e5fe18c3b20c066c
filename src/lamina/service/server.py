"""gRPC server of containerd's snapshots API over a Lamina snapshotter.

containerd loads this server as a proxy snapshotter plugin: it connects to
the unix socket and calls `containerd.services.snapshots.v1.Snapshots`.

Invariants:

- Errors leave as the gRPC status code of each `LaminaError` class's
  `grpc_code`. containerd turns NotFound, AlreadyExists,
  FailedPrecondition, InvalidArgument, Unimplemented and Unavailable back
  into its own error kinds, on which its unpacker and garbage collector
  branch. Any other exception is logged and sent as INTERNAL.
- The `snapshotter` field of requests and the containerd namespace header
  are ignored. containerd sends the proxy plugin's name, and its garbage
  collector sends no namespace. Keys already carry the namespace
  ("default/12/sha256:...").
- Requests run on a thread pool, so the snapshotter must be thread-safe.
- One server per root: `SnapshotServer.start` takes an exclusive flock on
  ROOT/serve.lock before it opens the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import IO, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2

from lamina.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LaminaError,
    UnavailableError,
    UnimplementedError,
)
from lamina.service._generated import snapshots_pb2, snapshots_pb2_grpc
from lamina.service.config import ServeConfig
from lamina.service.convert import info_from_proto, info_to_proto, mounts_to_proto
from lamina.snapshots.protocol import Snapshotter

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Infos per ListSnapshotsResponse message: containerd's client reads any
# batch size, and 100 infos of typical size stay far below gRPC's 4 MiB
# default message limit.
LIST_BATCH_SIZE = 100

# Seconds that SIGTERM or SIGINT leaves requests in flight to finish before
# they are cancelled.
STOP_GRACE_SECONDS = 10.0

LOCK_NAME = "serve.lock"

SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660


def _status_code(error: LaminaError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[error.grpc_code]
    except KeyError:
        return grpc.StatusCode.INTERNAL


# The generated servicer base class has no type stubs (protoc writes .pyi
# files only for messages), so mypy types it as Any.
class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):  # type: ignore[misc]
    """The Snapshots service: each method calls the snapshotter and converts the result."""

    def __init__(self, snapshotter: Snapshotter, list_batch_size: int = LIST_BATCH_SIZE) -> None:
        self._snapshotter = snapshotter
        self._list_batch_size = list_batch_size

    @contextlib.contextmanager
    def _request(self, context: grpc.ServicerContext, operation: str, key: str) -> Iterator[None]:
        """Log the request at debug level with KEY and its duration, and map its errors."""
        start = time.perf_counter()
        try:
            yield
        except LaminaError as err:
            self._log_done(operation, key, start, err)
            self._abort(context, err)
        except Exception as err:
            # An unexpected failure is handled only here. It is logged with
            # its traceback and sent as INTERNAL, so containerd gets an error.
            logger.exception("%s key=%r failed", operation, key)
            self._abort(context, InternalError(f"{operation} {key!r}: {err}", subject=key))
        self._log_done(operation, key, start, None)

    def _call(
        self, context: grpc.ServicerContext, operation: str, key: str, fn: Callable[[], T]
    ) -> T:
        with self._request(context, operation, key):
            result = fn()
        return result

    @staticmethod
    def _log_done(operation: str, key: str, start: float, error: LaminaError | None) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        elapsed_ms = (time.perf_counter() - start) * 1000
        if error is None:
            logger.debug("%s key=%r done in %.2f ms", operation, key, elapsed_ms)
        else:
            logger.debug(
                "%s key=%r failed in %.2f ms: %s %s",
                operation,
                key,
                elapsed_ms,
                error.grpc_code,
                error,
            )

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: LaminaError) -> NoReturn:
        context.abort(_status_code(error), str(error))
        # context.abort always raises; this line only satisfies NoReturn.
        raise AssertionError("grpc.ServicerContext.abort returned")

    def Prepare(
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = self._call(
            context,
            "prepare",
            request.key,
            lambda: self._snapshotter.prepare(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self._call(
            context,
            "view",
            request.key,
            lambda: self._snapshotter.view(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        mounts = self._call(
            context, "mounts", request.key, lambda: self._snapshotter.mounts(request.key)
        )
        return snapshots_pb2.MountsResponse(mounts=mounts_to_proto(mounts))

    def Commit(
        self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        def commit() -> None:
            if request.parent:
                self._check_commit_parent(request.key, request.parent)
            self._snapshotter.commit(request.name, request.key, dict(request.labels))

        self._call(context, "commit", request.key, commit)
        return empty_pb2.Empty()

    def _check_commit_parent(self, key: str, parent: str) -> None:
        # containerd 2.x sends a parent with commit only to rebase a snapshot
        # (parallel unpack), and only to snapshotters that declare the
        # "rebase" capability; Lamina declares none. A parent equal to the
        # current one is no rebase and is accepted.
        current = self._snapshotter.stat(key).parent
        if parent != current:
            raise UnimplementedError(
                f"commit {key!r}: rebasing onto parent {parent!r} is not supported "
                f"(the snapshot's parent is {current!r})",
                subject=key,
            )

    def Remove(
        self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._call(context, "remove", request.key, lambda: self._snapshotter.remove(request.key))
        return empty_pb2.Empty()

    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        info = self._call(context, "stat", request.key, lambda: self._snapshotter.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=info_to_proto(info))

    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        # Only the name and labels of the request's info are read: kind,
        # parent and times are immutable, so an unset kind does not matter.
        info = info_from_proto(request.info)
        paths = tuple(request.update_mask.paths)
        updated = self._call(
            context, "update", info.name, lambda: self._snapshotter.update(info, *paths)
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_proto(updated))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        filters = tuple(request.filters)
        # The stream is one request: logged once, with the filters as its
        # subject, when the last batch has been sent.
        with self._request(context, "list", " ".join(filters)):
            for batch in self._batches(filters):
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)

    def _batches(self, filters: tuple[str, ...]) -> Iterator[list[snapshots_pb2.Info]]:
        batch: list[snapshots_pb2.Info] = []
        for info in self._snapshotter.list(*filters):
            batch.append(info_to_proto(info))
            if len(batch) >= self._list_batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        usage = self._call(
            context, "usage", request.key, lambda: self._snapshotter.usage(request.key)
        )
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(
        self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        removed = self._call(context, "cleanup", "", self._snapshotter.cleanup)
        if removed:
            logger.info("cleanup removed %d unused directories", len(removed))
        return empty_pb2.Empty()


class RootLock:
    """An exclusive flock on ROOT/serve.lock, held while a server runs on ROOT."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        # The same mode as the snapshotter gives a root it creates.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise UnavailableError(
                f"serve: root {str(self.path.parent)!r} is in use by another lamina serve "
                f"(pid {holder} holds {str(self.path)!r}); stop it or choose another --root",
                subject=str(self.path.parent),
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            # The lock file stays: removing it would let a second server lock
            # a fresh file while a third still holds the old one.
            self._file.close()
            self._file = None


def _socket_in_use(path: Path) -> bool:
    """Return whether a server accepts connections on the unix socket PATH."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as err:
            if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a server that is gone; reject a live one or a non-socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPreconditionError(
            f"serve: address {str(path)!r} exists and is not a socket; remove it or "
            "choose another --address",
            subject=str(path),
        )
    if _socket_in_use(path):
        raise UnavailableError(
            f"serve: address {str(path)!r} is in use by a running server; stop it or "
            "choose another --address",
            subject=str(path),
        )
    logger.info("removing stale socket %s", path)
    path.unlink()


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise InvalidArgumentError(
            f"serve: socket group {name!r} not found", subject=name
        ) from None


class SnapshotServer:
    """One `lamina serve`: the root lock, the snapshotter, the socket and the gRPC server."""

    def __init__(
        self,
        config: ServeConfig,
        open_snapshotter: Callable[[Path, str | None], Snapshotter] | None = None,
        max_workers: int | None = None,
    ) -> None:
        self.config = config
        self._open = open_snapshotter or _open_core_snapshotter
        self._max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._lock = RootLock(config.root)
        self._snapshotter: Snapshotter | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._server: grpc.Server | None = None

    @property
    def address(self) -> Path:
        return self.config.address

    def start(self) -> None:
        """Lock the root, open the store and listen; undo every step if one fails."""
        config = self.config
        group_id = _group_id(config.socket_group) if config.socket_group else None

        with contextlib.ExitStack() as undo:
            self._lock.acquire()
            undo.callback(self._lock.release)

            snapshotter = self._open(config.root, config.driver)
            undo.callback(snapshotter.close)

            config.address.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_socket(config.address)
            executor = futures.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="lamina-grpc"
            )
            undo.callback(executor.shutdown, wait=True)
            server = grpc.server(executor)
            snapshots_pb2_grpc.add_SnapshotsServicer_to_server(
                SnapshotsService(snapshotter), server
            )
            self._bind(server, config.address)
            undo.callback(self._remove_socket)
            self._set_socket_access(config.address, group_id)
            server.start()

            undo.pop_all()

        self._snapshotter = snapshotter
        self._executor = executor
        self._server = server
        logger.info(
            "serving containerd snapshots API on %s (root %s, driver %s)",
            config.address,
            config.root,
            getattr(snapshotter, "driver_name", config.driver),
        )

    @staticmethod
    def _bind(server: grpc.Server, address: Path) -> None:
        # gRPC creates the socket when the port is added. A umask that
        # leaves only the owner's bits makes it 0600 from the start, so no
        # other user can connect before the chmod below.
        old_umask = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{address}")
        except RuntimeError as err:
            raise UnavailableError(
                f"serve: failed to listen on {str(address)!r}: {err}", subject=str(address)
            ) from err
        finally:
            os.umask(old_umask)

    @staticmethod
    def _set_socket_access(address: Path, group_id: int | None) -> None:
        if group_id is None:
            os.chmod(address, SOCKET_MODE)
            return
        os.chown(address, -1, group_id)
        os.chmod(address, GROUP_SOCKET_MODE)

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.config.address.unlink()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Finish requests in flight (up to GRACE seconds), then close the store and socket."""
        server, executor, snapshotter = self._server, self._executor, self._snapshotter
        if server is None or executor is None or snapshotter is None:
            return
        self._server = self._executor = self._snapshotter = None

        logger.info("stopping: finishing requests in flight (up to %.0f s)", grace)
        server.stop(grace).wait()
        # A cancelled request's handler still runs on its thread; waiting for
        # the pool keeps the store open until the last one returns.
        executor.shutdown(wait=True)
        snapshotter.close()
        self._remove_socket()
        self._lock.release()
        logger.info("stopped serving on %s", self.config.address)

    def __enter__(self) -> SnapshotServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _open_core_snapshotter(root: Path, driver: str | None) -> Snapshotter:
    from lamina.drivers import open_snapshotter

    return open_snapshotter(root, driver=driver)


def serve(config: ServeConfig, grace: float = STOP_GRACE_SECONDS) -> None:
    """Run a server until SIGTERM or SIGINT, then stop it gracefully.

    Must be called from the main thread, which receives the signals.
    """
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server = SnapshotServer(config)
        server.start()
        try:
            # Event.wait with a timeout lets the main thread run the signal
            # handler promptly.
            while not stop_requested.wait(1.0):
                pass
        finally:
            server.stop(grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
