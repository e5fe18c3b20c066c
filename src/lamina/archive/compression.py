"""Compression of layer streams: detection, streaming decompression and compression.

A layer blob is an uncompressed tar, a gzip stream or a zstd stream. The
media type may be wrong or missing, so `LayerStream` detects the format from
the first bytes: gzip 1f 8b (RFC 1952), zstd frame magic 28 b5 2f fd
(RFC 8878). Decompression and the sha256 of the uncompressed bytes (the
layer's diff id) run on a background thread, so they overlap with the file
system calls of the applier; the chunk queue between the two is bounded,
which bounds memory whatever the layer size.

gzip is decoded with ISA-L (the `isal` package): on the debian test image
it inflates 2.5 times as fast as zlib and as fast as rapidgzip with two
threads, while using one core (figures in benchmarks/apply_layers.py).
"""

from __future__ import annotations

import enum
import hashlib
import os
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Protocol

import zstandard
from isal import isal_zlib

from lamina.archive.errors import LayerError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Size of the chunks passed from the decompression thread to the applier, and
# how many may wait in the queue: at most 4 chunks (16 MiB) in flight, one
# being filled, two queued and one being applied. Smaller chunks cost more
# hand-overs of the GIL between the threads: 1 MiB chunks made the debian
# test image 20% slower to apply (benchmarks/apply_layers.py).
CHUNK_SIZE = 1 << 22
QUEUE_CHUNKS = 2
# Compressed bytes read at a time: a quarter of a chunk, because the
# decompressor keeps a copy of the unread part of its input.
INPUT_SIZE = CHUNK_SIZE // 4


class Compression(enum.Enum):
    """Compression of a layer blob."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"

    @classmethod
    def parse(cls, text: str) -> Compression:
        """Parse "none", "gzip" or "zstd"."""
        for member in cls:
            if member.value == text:
                return member
        from lamina.errors import InvalidArgumentError

        names = ", ".join(m.value for m in cls)
        raise InvalidArgumentError(
            f"invalid compression {text!r}: expected one of {names}", subject=text
        )


def detect_compression(head: bytes) -> Compression:
    """Return the compression whose magic number starts HEAD, NONE for anything else."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _CountingReader:
    """Reads the compressed input after the bytes already consumed for detection."""

    def __init__(self, head: bytes, stream: _Readable) -> None:
        self._head = head
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
        else:
            data = self._stream.read(size if size > 0 else CHUNK_SIZE)
        self.count += len(data)
        return data


class ZstdFrameTracker:
    """Follows the frame and block boundaries of a zstd stream (RFC 8878, section 3.1).

    python-zstandard's stream reader ends quietly when the input stops in
    the middle of a frame. The tracker reads only the frame and block
    headers of the compressed bytes to tell a complete stream from a
    truncated one, which costs a few Python steps per block (128 KiB at most).
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4
        self._pending = b""
        self._skip = 0
        self._checksum = False
        self.error: str | None = None

    @property
    def complete(self) -> bool:
        """True when the bytes fed so far end exactly after a frame."""
        return self._state == "magic" and not self._pending and not self._skip

    def feed(self, data: bytes) -> None:
        """Track DATA, the next bytes of the compressed stream."""
        pos = 0
        size = len(data)
        while pos < size and self.error is None:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                continue
            take = data[pos : pos + self._need - len(self._pending)]
            pos += len(take)
            self._pending += take
            if len(self._pending) == self._need:
                field, self._pending = self._pending, b""
                self._advance(field)

    def _advance(self, field: bytes) -> None:
        if self._state == "magic":
            if field == ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif field[1:] == b"\x2a\x4d\x18" and field[0] & 0xF0 == 0x50:
                self._state, self._need = "skippable", 4
            else:
                self.error = "data after the last zstd frame"
        elif self._state == "skippable":
            self._skip = int.from_bytes(field, "little")
            self._state, self._need = "magic", 4
        elif self._state == "descriptor":
            descriptor = field[0]
            single_segment = descriptor >> 5 & 1
            self._checksum = bool(descriptor >> 2 & 1)
            content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
            self._skip = (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size
            self._state, self._need = "block", 3
        else:
            header = int.from_bytes(field, "little")
            block_type = header >> 1 & 3
            if block_type == 3:
                self.error = "reserved zstd block type"
                return
            self._skip = 1 if block_type == 1 else header >> 3
            if header & 1:
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4


class _TrackingReader:
    """A reader that shows every byte it passes to a ZstdFrameTracker."""

    def __init__(self, source: _CountingReader, tracker: ZstdFrameTracker) -> None:
        self._source = source
        self._tracker = tracker

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._tracker.feed(data)
        return data


class _Failure:
    """A decompression error handed from the producer thread to the reader."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = b""

# isal's stub declares its error class as an instance, hence the type().
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    isal_zlib.IsalError if isinstance(isal_zlib.IsalError, type) else type(isal_zlib.error),
    zstandard.ZstdError,
)


class LayerStream:
    """Uncompressed bytes of a layer, read forward only, hashed as they pass.

    The producer thread is started by `start` and stopped by `close`.
    `diff_id`, `tell()` and `compressed_size` are final once `drain` returned.
    """

    def __init__(self, stream: BinaryIO, *, layer: str | None) -> None:
        self._source = stream
        self.layer = layer
        self.compression = Compression.NONE
        self._queue: queue.Queue[bytes | _Failure] = queue.Queue(QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hash = hashlib.sha256()
        self._counter: _CountingReader | None = None
        self._chunk: bytes = b""
        self._view = memoryview(b"")
        self._pos = 0  # offset in the current chunk
        self._offset = 0  # bytes handed out so far
        self._eof = False
        self.last_read = b""

    # ------------------------------------------------------------ producer

    def start(self) -> None:
        """Detect the compression and start the decompression thread."""
        head = b""
        while len(head) < len(ZSTD_MAGIC):
            more = self._source.read(len(ZSTD_MAGIC) - len(head))
            if not more:
                break
            head += more
        self.compression = detect_compression(head)
        self._counter = _CountingReader(head, self._source)
        self._thread = threading.Thread(
            target=self._produce, name=f"layer-decompress {self.layer or ''}", daemon=True
        )
        self._thread.start()

    def _put(self, item: bytes | _Failure) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        assert self._counter is not None
        try:
            for chunk in self._decompressed(self._counter):
                self._hash.update(chunk)
                if not self._put(chunk):
                    return
            self._put(_END)
        except LayerError as err:
            self._put(_Failure(err))
        except _DECOMPRESSION_ERRORS as err:
            self._put(_Failure(self._stream_error(f"reading the layer stream failed: {err}", err)))

    def _stream_error(self, reason: str, cause: BaseException | None = None) -> LayerError:
        error = LayerError(reason, layer=self.layer)
        error.__cause__ = cause
        return error

    def _decompressed(self, source: _CountingReader) -> Iterator[bytes]:
        if self.compression is Compression.GZIP:
            yield from self._gunzip(source)
        elif self.compression is Compression.ZSTD:
            tracker = ZstdFrameTracker()
            tracking = _TrackingReader(source, tracker)
            reader = zstandard.ZstdDecompressor().stream_reader(
                tracking,  # type: ignore[arg-type]
                read_size=INPUT_SIZE,
                read_across_frames=True,
                closefd=False,
            )
            while data := reader.read(CHUNK_SIZE):
                if tracker.error is not None:
                    break
                yield data
            while tracker.error is None and tracking.read(CHUNK_SIZE):
                pass
            if tracker.error is not None:
                raise self._stream_error(tracker.error)
            if not tracker.complete:
                raise self._stream_error("the zstd stream is truncated")
        else:
            while data := source.read(CHUNK_SIZE):
                yield data

    def _gunzip(self, source: _CountingReader) -> Iterator[bytes]:
        # A gzip file may hold several members (RFC 1952 2.2; pigz and
        # concatenated files make them); NUL padding after the last member is
        # tolerated as gzip(1) does.
        inflater = isal_zlib.decompressobj(wbits=31)
        pending = b""
        while True:
            if not pending:
                pending = source.read(INPUT_SIZE)
                if not pending:
                    break
            if inflater.eof:
                if not pending.strip(b"\0"):
                    pending = b""
                    continue
                if not pending.startswith(GZIP_MAGIC[: len(pending)]):
                    raise self._stream_error("data after the end of the gzip stream")
                inflater = isal_zlib.decompressobj(wbits=31)
            data = inflater.decompress(pending, CHUNK_SIZE)
            if data:
                yield data
            pending = inflater.unconsumed_tail or inflater.unused_data
        if not inflater.eof:
            raise self._stream_error("the gzip stream is truncated")
        while data := inflater.flush():
            yield data

    # ------------------------------------------------------------ consumer

    def _next_chunk(self) -> bool:
        if self._eof:
            return False
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._eof = True
            raise item.error
        if item is _END or not item:
            self._eof = True
            return False
        self._chunk = item
        self._view = memoryview(item)
        self._pos = 0
        return True

    def read(self, size: int = -1) -> bytes:
        """Return up to SIZE bytes (fewer only at the end of the stream)."""
        if size < 0:
            raise ValueError("LayerStream.read needs a size")
        if self._pos + size <= len(self._chunk):
            data = self._chunk[self._pos : self._pos + size]
            self._pos += size
        else:
            parts = [self._chunk[self._pos :]]
            missing = size - len(parts[0])
            self._pos = len(self._chunk)
            while missing > 0 and self._next_chunk():
                part = self._chunk[:missing]
                self._pos = len(part)
                missing -= len(part)
                parts.append(part)
            data = b"".join(parts)
        self._offset += len(data)
        self.last_read = data
        return data

    def tell(self) -> int:
        """Return how many uncompressed bytes were read or skipped so far."""
        return self._offset

    def seek(self, offset: int, whence: int = 0) -> int:
        """Skip forward to OFFSET; a layer stream cannot go back."""
        if offset != self._offset or whence != 0:
            if whence != 0 or offset < self._offset:
                raise self._stream_error(f"backward seek to {offset} in a forward-only stream")
            self.skip(offset - self._offset)
        return self._offset

    def skip(self, size: int) -> None:
        """Discard SIZE bytes; raise LayerError when the stream ends first."""
        while size > 0:
            if self._pos >= len(self._chunk) and not self._next_chunk():
                raise self._stream_error("the tar stream is truncated inside an entry's data")
            step = min(len(self._chunk) - self._pos, size)
            self._pos += step
            self._offset += step
            size -= step

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next SIZE bytes to the file descriptor FD, straight from the queue's chunks.

        Raises LayerError when the stream ends first and OSError when a write fails.
        """
        while size > 0:
            if self._pos >= len(self._chunk) and not self._next_chunk():
                raise self._stream_error("the tar stream is truncated inside an entry's data")
            end = self._pos + size
            if end > len(self._chunk):
                end = len(self._chunk)
            written = os.write(fd, self._view[self._pos : end])
            self._pos += written
            self._offset += written
            size -= written

    def chunks(self, size: int) -> Iterator[memoryview]:
        """Yield the next SIZE bytes as views into the queue's chunks."""
        missing = size
        while missing > 0:
            if self._pos >= len(self._chunk) and not self._next_chunk():
                raise self._stream_error("the tar stream is truncated inside an entry's data")
            end = min(len(self._chunk), self._pos + missing)
            view = self._view[self._pos : end]
            missing -= end - self._pos
            self._offset += end - self._pos
            self._pos = end
            yield view

    def drain(self) -> None:
        """Read the rest of the stream so that the digest covers all of it."""
        self._offset += len(self._chunk) - self._pos
        self._pos = len(self._chunk)
        while self._next_chunk():
            self._offset += len(self._chunk)
            self._pos = len(self._chunk)

    @property
    def diff_id(self) -> str:
        """Digest of the uncompressed bytes seen so far, "sha256:HEX"."""
        return "sha256:" + self._hash.hexdigest()

    @property
    def compressed_size(self) -> int:
        """Bytes read from the source so far."""
        return self._counter.count if self._counter is not None else 0

    def close(self) -> None:
        """Stop the producer thread; safe to call more than once."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)
            self._thread = None


# ---------------------------------------------------------------- compression


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class CompressingWriter:
    """Writes compressed bytes to OUT; hashes both the plain and the compressed bytes.

    gzip uses zlib at level 6 with a fixed header (no name, mtime 0), so the
    same tar always gives the same blob with the same zlib. zstd uses level 3
    and is deterministic too.
    """

    def __init__(self, out: _Writable, compression: Compression) -> None:
        self._out = out
        self.compression = compression
        self.plain_hash = hashlib.sha256()
        self.compressed_hash = hashlib.sha256()
        self.size = 0
        self.compressed_size = 0
        self._gzip: zlib._Compress | None = None
        self._zstd: zstandard.ZstdCompressionObj | None = None
        if compression is Compression.GZIP:
            self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif compression is Compression.ZSTD:
            self._zstd = zstandard.ZstdCompressor(level=3).compressobj()

    def _emit(self, data: bytes) -> None:
        if data:
            self.compressed_hash.update(data)
            self.compressed_size += len(data)
            self._out.write(data)

    def write(self, data: bytes) -> int:
        """Compress and write DATA."""
        self.plain_hash.update(data)
        self.size += len(data)
        if self._gzip is not None:
            self._emit(self._gzip.compress(data))
        elif self._zstd is not None:
            self._emit(self._zstd.compress(data))
        else:
            self._emit(bytes(data))
        return len(data)

    def tell(self) -> int:
        """Return the uncompressed bytes written so far (tarfile reads it when opening)."""
        return self.size

    def finish(self) -> None:
        """Flush the compressor; OUT is left open."""
        if self._gzip is not None:
            self._emit(self._gzip.flush())
        elif self._zstd is not None:
            self._emit(self._zstd.flush())
