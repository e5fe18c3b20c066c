"""Content digests, diff ids and chain ids of OCI images.

A digest is "ALGORITHM:ENCODED" (OCI image-spec, descriptor.md); Lamina
verifies sha256 and sha512 digests. A layer's diff id is the digest of its
uncompressed tar stream, and its chain id names the whole stack up to it
(OCI image-spec, config.md "Layer ChainID"):

    ChainID(L0) = DiffID(L0)
    ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from lamina.images.errors import InvalidImageError

# Encoded lengths fixed by the OCI image-spec for the registered algorithms.
_ENCODED_LENGTH = {"sha256": 64, "sha512": 128}
_ENCODED = re.compile(r"[a-f0-9]+")


def parse_digest(text: str, *, what: str = "digest") -> tuple[str, str]:
    """Split a digest into (algorithm, encoded); InvalidImageError if malformed."""
    algorithm, sep, encoded = text.partition(":")
    expected = _ENCODED_LENGTH.get(algorithm)
    if not sep or expected is None:
        raise InvalidImageError(
            f"invalid {what} {text!r}: expected sha256:HEX or sha512:HEX", subject=text
        )
    if len(encoded) != expected or not _ENCODED.fullmatch(encoded):
        raise InvalidImageError(
            f"invalid {what} {text!r}: expected {expected} lowercase hex digits after {algorithm}:",
            subject=text,
        )
    return algorithm, encoded


def new_hasher(digest: str) -> hashlib._Hash:
    """Return a hash object of the algorithm of DIGEST."""
    algorithm, _ = parse_digest(digest)
    return hashlib.new(algorithm)


def sha256_digest(data: bytes) -> str:
    """Return the sha256 digest of DATA in "sha256:HEX" form."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Return the chain id of each layer of a stack given its diff ids, bottom first."""
    result: list[str] = []
    for diff_id in diff_ids:
        parse_digest(diff_id, what="diff id")
        if not result:
            result.append(diff_id)
        else:
            result.append(sha256_digest(f"{result[-1]} {diff_id}".encode()))
    return result


def short(digest: str, length: int = 12) -> str:
    """Return the first LENGTH hex digits of a digest, for progress and logs."""
    return digest.partition(":")[2][:length] or digest
