"""Detect and decompress the compressions image layers and archives use.

The compression is detected from the first bytes of the stream, as
containerd does, instead of trusting a media type: docker-archive layers
carry no media type, and some tools label a gzip layer as plain tar.

gzip streams are inflated with ISA-L (the `isal` package), about 1.5 times
as fast as zlib, in a background thread of their own so that inflating
one layer overlaps with writing its files; the stream may hold several
gzip members, as pigz and `gzip -c a b` write them (RFC 1952, 2.2).
"""

from __future__ import annotations

import gzip
import io
import lzma
import zlib
from typing import IO, cast

import zstandard
from isal import igzip_threaded, isal_zlib

GZIP = "gzip"
ZSTD = "zstd"
BZIP2 = "bzip2"
XZ = "xz"

# Magic numbers: RFC 1952 (gzip), RFC 8878 (zstd frame), bzip2's "BZh",
# and the xz file format's header magic.
_MAGIC = (
    (b"\x1f\x8b", GZIP),
    (b"\x28\xb5\x2f\xfd", ZSTD),
    (b"BZh", BZIP2),
    (b"\xfd7zXZ\x00", XZ),
)
MAGIC_LENGTH = 6

# Size of the blocks the gzip thread hands over; two are queued at most,
# plus the thread's read buffer of eight blocks (isal's igzip_threaded).
GZIP_BLOCK = 256 * 1024

# Errors the decompressors raise for corrupt or truncated input, and read errors.
ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    gzip.BadGzipFile,
    cast(type[BaseException], isal_zlib.IsalError),
    zlib.error,
    zstandard.ZstdError,
    lzma.LZMAError,
    EOFError,
)


def detect(head: bytes) -> str | None:
    """Return the compression whose magic number starts HEAD, or None for plain data."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def open_gzip(raw: IO[bytes]) -> io.BufferedIOBase:
    """Return a reader of the inflated content of the gzip stream RAW.

    Inflating runs in a thread that the reader owns; closing the reader
    stops it. The reader does not close RAW.
    """
    reader: io.BufferedIOBase = igzip_threaded.open(  # type: ignore[no-untyped-call]
        raw, "rb", block_size=GZIP_BLOCK
    )
    return reader


def open_zstd(raw: IO[bytes]) -> io.BufferedIOBase:
    """Return a reader of the decompressed content of the zstd stream RAW (all frames)."""
    decompressor = zstandard.ZstdDecompressor()
    reader = decompressor.stream_reader(raw, read_across_frames=True, closefd=False)
    return io.BufferedReader(reader, buffer_size=GZIP_BLOCK)


def open_decompressed(raw: IO[bytes], kind: str | None) -> io.BufferedIOBase:
    """Return a reader of RAW decompressed according to KIND (None: as it is)."""
    if kind is None:
        return io.BufferedReader(raw, buffer_size=GZIP_BLOCK)  # type: ignore[type-var]
    if kind == GZIP:
        return open_gzip(raw)
    if kind == ZSTD:
        return open_zstd(raw)
    if kind == BZIP2:
        import bz2

        return bz2.BZ2File(raw)
    return lzma.LZMAFile(raw)
