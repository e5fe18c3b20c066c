"""Progress events of an image import, for a terminal display or a log.

The importer calls these methods from its worker threads; an implementation
must be thread-safe. The library's default, `NoProgress`, ignores them; the
command line renders bars on a terminal and log lines elsewhere.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)


class LayerState(enum.Enum):
    """State of one layer during an import."""

    WAITING = "waiting"
    UNPACKING = "unpacking"
    UNPACKED = "unpacked"
    REUSED = "reused"
    FAILED = "failed"


class Progress(Protocol):
    """Receiver of import progress events."""

    def start(self, name: str, layers: list[tuple[str, int]]) -> None:
        """Announce an import of NAME with (digest or path, size in bytes) per layer."""
        ...

    def layer_state(self, index: int, state: LayerState) -> None:
        """Report that layer INDEX entered STATE."""
        ...

    def layer_bytes(self, index: int, count: int) -> None:
        """Report COUNT more blob bytes of layer INDEX read."""
        ...

    def finish(self, ok: bool) -> None:
        """Announce the end of the import."""
        ...


class NoProgress:
    """A progress receiver that ignores every event."""

    def start(self, name: str, layers: list[tuple[str, int]]) -> None:
        pass

    def layer_state(self, index: int, state: LayerState) -> None:
        pass

    def layer_bytes(self, index: int, count: int) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


class LogProgress:
    """Progress as log lines at INFO: one per layer state change, and bytes every few seconds."""

    def __init__(self, logger: logging.Logger | None = None, interval: float = 5.0) -> None:
        self._log = logger or log
        self._interval = interval
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._sizes: list[int] = []
        self._done = 0
        self._total = 0
        self._started = 0.0
        self._last_report = 0.0
        self._image = ""

    def start(self, name: str, layers: list[tuple[str, int]]) -> None:
        with self._lock:
            self._image = name
            self._names = [layer for layer, _ in layers]
            self._sizes = [size for _, size in layers]
            self._total = sum(self._sizes)
            self._started = self._last_report = time.monotonic()
        self._log.info("importing %s: %d layers, %.1f MB", name, len(layers), self._total / 1e6)

    def layer_state(self, index: int, state: LayerState) -> None:
        if state is LayerState.WAITING:
            return
        if state is LayerState.REUSED:
            with self._lock:
                self._done += self._sizes[index]
        self._log.info(
            "layer %d/%d %s: %s", index + 1, len(self._names), self._names[index], state.value
        )

    def layer_bytes(self, index: int, count: int) -> None:
        with self._lock:
            self._done += count
            now = time.monotonic()
            if now - self._last_report < self._interval:
                return
            self._last_report = now
            done, total, elapsed = self._done, self._total, now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        self._log.info(
            "%s: %.1f of %.1f MB read, %.1f MB/s", self._image, done / 1e6, total / 1e6, rate / 1e6
        )

    def finish(self, ok: bool) -> None:
        elapsed = time.monotonic() - self._started
        self._log.info(
            "import of %s %s after %.1f s", self._image, "done" if ok else "failed", elapsed
        )
