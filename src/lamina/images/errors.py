"""Errors of image import, narrower than the families of `lamina.errors`.

A malformed or corrupt archive is an `InvalidImageError` (an invalid
argument: the archive given is unusable as it is); a blob whose digest,
size or diff id differs from what the manifest or config records is a
`DigestMismatchError`, with the blob's digest or path as its subject.
"""

from __future__ import annotations

from lamina.errors import InvalidArgumentError, NotFoundError


class InvalidImageError(InvalidArgumentError):
    """The archive or one of its documents is malformed or incomplete."""


class DigestMismatchError(InvalidImageError):
    """A blob's digest, size or diff id differs from the recorded one."""


class PlatformNotFoundError(NotFoundError):
    """The image index lists no manifest for the requested platform."""


class ImageNotFoundError(NotFoundError):
    """No image record of that name exists."""
