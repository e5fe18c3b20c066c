"""The error table: one class per gRPC code, stable exit codes, and lookups both ways."""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest

import lamina
from lamina import errors
from lamina.errors import (
    CODES,
    USAGE_EXIT_CODE,
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LaminaError,
    NotFoundError,
    UnavailableError,
    error_class_for_grpc_code,
)


def _all_subclasses(cls: type[LaminaError]) -> set[type[LaminaError]]:
    found: set[type[LaminaError]] = set()
    stack = [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def _import_lamina_modules() -> None:
    # Narrower error classes live beside the code raising them; importing
    # every module makes them visible to __subclasses__. Generated protobuf
    # code needs nothing from the error table, and importing __main__ would
    # run the command line.
    for module in pkgutil.walk_packages(lamina.__path__, "lamina."):
        if "._generated" in module.name or module.name.endswith(".__main__"):
            continue
        importlib.import_module(module.name)


def test_grpc_codes_distinct() -> None:
    codes = [row.grpc_code for row in CODES]
    assert len(codes) == len(set(codes))


def test_exit_codes_distinct() -> None:
    exit_codes = [row.exit_code for row in CODES]
    assert len(exit_codes) == len(set(exit_codes))


def test_exit_codes_avoid_success_and_usage() -> None:
    for row in CODES:
        assert row.exit_code not in (0, USAGE_EXIT_CODE), row
        assert 0 < row.exit_code < 126, row


def test_table_matches_class_attributes() -> None:
    for row in CODES:
        assert row.error_class.grpc_code == row.grpc_code
        assert row.error_class.exit_code == row.exit_code


@pytest.mark.parametrize("row", CODES, ids=[row.grpc_code for row in CODES])
def test_grpc_code_round_trip(row: errors.ErrorCode) -> None:
    assert error_class_for_grpc_code(row.grpc_code) is row.error_class


def test_grpc_codes_are_real_status_codes() -> None:
    for row in CODES:
        assert grpc.StatusCode[row.grpc_code].name == row.grpc_code


@pytest.mark.parametrize(
    ("error_class", "grpc_code"),
    [
        (NotFoundError, "NOT_FOUND"),
        (AlreadyExistsError, "ALREADY_EXISTS"),
        (FailedPreconditionError, "FAILED_PRECONDITION"),
        (InvalidArgumentError, "INVALID_ARGUMENT"),
        (UnavailableError, "UNAVAILABLE"),
        (InternalError, "INTERNAL"),
    ],
)
def test_required_families_present(error_class: type[LaminaError], grpc_code: str) -> None:
    assert error_class.grpc_code == grpc_code
    assert error_class in {row.error_class for row in CODES}


def test_unknown_grpc_code_is_internal() -> None:
    assert error_class_for_grpc_code("DATA_LOSS") is InternalError
    assert error_class_for_grpc_code("no such code") is InternalError


def test_every_direct_subclass_in_table() -> None:
    _import_lamina_modules()
    tabled = {row.error_class for row in CODES}
    direct = set(LaminaError.__subclasses__())
    assert direct == tabled


def test_narrow_classes_keep_family_codes() -> None:
    _import_lamina_modules()
    tabled = {row.error_class: row for row in CODES}
    for cls in _all_subclasses(LaminaError):
        family = next(base for base in cls.__mro__ if base in tabled)
        assert cls.grpc_code == family.grpc_code, cls
        assert cls.exit_code == family.exit_code, cls
        assert issubclass(error_class_for_grpc_code(cls.grpc_code), LaminaError)
        assert error_class_for_grpc_code(cls.grpc_code) is family, cls


def test_message_and_subject() -> None:
    err = NotFoundError("stat 'k1': snapshot does not exist", subject="k1")
    assert str(err) == "stat 'k1': snapshot does not exist"
    assert err.message == str(err)
    assert err.subject == "k1"
    assert NotFoundError("no subject").subject is None


def test_cause_is_chained() -> None:
    cause = OSError(28, "No space left on device")
    with pytest.raises(InternalError) as caught:
        try:
            raise cause
        except OSError as err:
            raise InternalError("commit 'k1': write failed") from err
    assert caught.value.__cause__ is cause
    assert isinstance(caught.value, LaminaError)
