"""Checks of keys, names and labels before any work is done on them."""

from __future__ import annotations

from collections.abc import Mapping

from lamina.errors import InvalidArgumentError

# containerd accepts arbitrary keys. A bound keeps one request from filling
# the store, and 16 KiB is far more than containerd's "namespace/number/key"
# keys need.
MAX_KEY_BYTES = 16 * 1024

# containerd's labels package rejects a label whose name and value together
# exceed 4096 bytes.
MAX_LABEL_BYTES = 4096

# Labels with this prefix given at prepare, view or commit are kept.
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"


def _utf8_length(text: str, what: str, operation: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            f"{operation}: {what} {text!r} is not valid UTF-8", subject=text
        ) from None


def validate_key(key: str, operation: str, what: str = "key") -> None:
    """Raise InvalidArgumentError unless KEY is a usable snapshot key or name."""
    if not isinstance(key, str) or key == "":
        raise InvalidArgumentError(f"{operation}: {what} must be a non-empty string", subject="")
    length = _utf8_length(key, what, operation)
    if length > MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"{operation}: {what} of {length} bytes is longer than the maximum of "
            f"{MAX_KEY_BYTES} bytes; use a shorter {what}",
            subject=key[:80],
        )
    if "\x00" in key:
        raise InvalidArgumentError(
            f"{operation}: {what} {key!r} contains a NUL character", subject=key
        )


def validate_labels(labels: Mapping[str, str], operation: str, key: str) -> None:
    """Raise InvalidArgumentError for an empty label name or an oversized label."""
    for name, value in labels.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgumentError(
                f"{operation} {key!r}: label names and values must be strings", subject=key
            )
        if name == "":
            raise InvalidArgumentError(
                f"{operation} {key!r}: a label name must not be empty", subject=key
            )
        size = _utf8_length(name, "label name", operation) + _utf8_length(
            value, "label value", operation
        )
        if size > MAX_LABEL_BYTES:
            raise InvalidArgumentError(
                f"{operation} {key!r}: label {name[:80]!r} is {size} bytes, name and value "
                f"together may be at most {MAX_LABEL_BYTES}",
                subject=key,
            )
        if "\x00" in name or "\x00" in value:
            raise InvalidArgumentError(
                f"{operation} {key!r}: label {name[:80]!r} contains a NUL character",
                subject=key,
            )
