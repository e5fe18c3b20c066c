"""Errors of layer apply and diff, each naming the layer and the tar entry involved."""

from __future__ import annotations

from lamina.errors import InternalError, InvalidArgumentError, NoSpaceError


def _describe(operation: str, layer: str | None, entry: str | None, reason: str) -> str:
    where = f"layer {layer!r}" if layer else "layer"
    if entry is not None:
        where += f", entry {entry!r}"
    return f"{operation} {where}: {reason}"


class LayerError(InvalidArgumentError):
    """The layer itself is at fault: a corrupt or truncated stream, or an unsafe entry.

    `layer` is the name the caller gave the layer (a digest or a file name),
    `entry` the tar member name as the archive spells it, or None when the
    fault is in the stream as a whole.
    """

    def __init__(
        self, reason: str, *, layer: str | None, entry: str | None = None, operation: str = "apply"
    ) -> None:
        super().__init__(_describe(operation, layer, entry, reason), subject=entry or layer)
        self.layer = layer
        self.entry = entry
        self.reason = reason


class LayerDigestError(LayerError):
    """The uncompressed stream does not hash to the diff id the caller expected."""

    def __init__(self, *, layer: str | None, expected: str, actual: str) -> None:
        super().__init__(
            f"diff id mismatch: expected {expected}, computed {actual}; "
            "the layer blob is corrupt or belongs to another image",
            layer=layer,
        )
        self.expected = expected
        self.actual = actual


class LayerWriteError(InternalError):
    """Writing an entry of a valid layer failed on the target filesystem (an I/O error)."""

    def __init__(
        self, reason: str, *, layer: str | None, entry: str | None = None, operation: str = "apply"
    ) -> None:
        super().__init__(_describe(operation, layer, entry, reason), subject=entry or layer)
        self.layer = layer
        self.entry = entry
        self.reason = reason


class LayerNoSpaceError(NoSpaceError):
    """Writing an entry failed because the target filesystem is full; retry once space is freed."""

    def __init__(
        self, reason: str, *, layer: str | None, entry: str | None = None, operation: str = "apply"
    ) -> None:
        super().__init__(_describe(operation, layer, entry, reason), subject=entry or layer)
        self.layer = layer
        self.entry = entry
        self.reason = reason
