"""The snapshotter conformance suite, run through the gRPC server and client.

Each test starts an in-process `SnapshotServer` on a fresh root and talks
to it with `RemoteSnapshotter` over a unix socket, so every operation
crosses the wire: requests, responses, status codes and the streamed list.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conformance")

from conformance import Factory, SnapshotterConformance  # noqa: E402

# The traits of each local driver (how deep a stack may be, whether usage
# counts a copied parent) hold unchanged behind the server.
from test_conformance import FACTORIES  # noqa: E402

from lamina.service.client import RemoteSnapshotter  # noqa: E402
from lamina.service.config import ServeConfig  # noqa: E402
from lamina.service.server import SnapshotServer  # noqa: E402
from lamina.snapshots import Snapshotter  # noqa: E402


class ServedSnapshotter(RemoteSnapshotter):
    """A client that owns its server: closing it stops the server too."""

    def __init__(self, server: SnapshotServer) -> None:
        super().__init__(str(server.address), timeout=60)
        self.server = server

    def close(self) -> None:
        super().close()
        self.server.stop(grace=5)


@dataclass
class ServedFactory:
    """Starts a server with one driver on a root; the attributes describe the driver."""

    driver: str
    max_lower_layers: int | None
    usage_excludes_parents: bool
    started: list[SnapshotServer] = field(default_factory=list)

    def __call__(self, root: Path) -> Snapshotter:
        config = ServeConfig(root=root, address=root.parent / "lamina.sock", driver=self.driver)
        server = SnapshotServer(config)
        server.start()
        self.started.append(server)
        return ServedSnapshotter(server)


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def snapshotter_factory(request: pytest.FixtureRequest) -> Iterator[Factory]:
    local = FACTORIES[request.param]
    factory = ServedFactory(local.driver, local.max_lower_layers, local.usage_excludes_parents)
    yield factory
    # stop() is idempotent; this covers a test that failed before closing.
    for server in factory.started:
        server.stop(grace=5)


class TestServiceConformance(SnapshotterConformance):
    """The whole suite, every call crossing the gRPC API."""
