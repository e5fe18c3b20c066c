"""Error types of Lamina, one family per gRPC status code.

Every error that Lamina raises on purpose is a `LaminaError`. Each direct
subclass stands for one gRPC status code, so the gRPC service and the
command line can map any error to a code and an exit status by its class
alone; narrower subclasses live beside the code that raises them. The table
`CODES` is the single place where classes meet gRPC code names and exit
statuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class LaminaError(Exception):
    """Root of Lamina's errors; `subject` is the key, path or name involved."""

    grpc_code: ClassVar[str] = "INTERNAL"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, subject: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.subject = subject

    def __str__(self) -> str:
        return self.message


class InternalError(LaminaError):
    """An unexpected failure: a bug, or a broken store or filesystem."""


class NotFoundError(LaminaError):
    """The snapshot, image or file named does not exist."""

    grpc_code = "NOT_FOUND"
    exit_code = 4


class AlreadyExistsError(LaminaError):
    """A snapshot or image of that key or name exists already."""

    grpc_code = "ALREADY_EXISTS"
    exit_code = 5


class FailedPreconditionError(LaminaError):
    """The request is valid but the state does not allow it now."""

    grpc_code = "FAILED_PRECONDITION"
    exit_code = 6


class InvalidArgumentError(LaminaError):
    """The request itself is malformed: a bad key, label, filter or field path."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = 3


class UnavailableError(LaminaError):
    """A resource is busy or locked; the same request may succeed later."""

    grpc_code = "UNAVAILABLE"
    exit_code = 7


class NoSpaceError(UnavailableError):
    """The filesystem under the root is full; the request may succeed once space is freed."""


class UnimplementedError(LaminaError):
    """The operation is not supported by this driver or build."""

    grpc_code = "UNIMPLEMENTED"
    exit_code = 8


@dataclass(frozen=True)
class ErrorCode:
    """One row of the error table: a class with its gRPC code and exit status."""

    error_class: type[LaminaError]
    grpc_code: str
    exit_code: int


CODES: tuple[ErrorCode, ...] = tuple(
    ErrorCode(cls, cls.grpc_code, cls.exit_code)
    for cls in (
        InternalError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        InvalidArgumentError,
        UnavailableError,
        UnimplementedError,
    )
)

# argparse exits with status 2 for a malformed command line; no class uses it.
USAGE_EXIT_CODE = 2


def error_class_for_grpc_code(grpc_code: str) -> type[LaminaError]:
    """Return the error class for a gRPC status code name such as "NOT_FOUND"."""
    for row in CODES:
        if row.grpc_code == grpc_code:
            return row.error_class
    return InternalError
