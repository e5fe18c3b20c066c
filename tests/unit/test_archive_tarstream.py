"""Pure logic of the layer reader: names, header parsing, compression detection, zstd frames."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.archive import Compression, LayerError, detect_compression
from lamina.archive.compression import LayerStream, ZstdFrameTracker
from lamina.archive.tarstream import _FastTarInfo, iter_members, mtime_ns, xattrs
from lamina.archive.tree import split_name


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b/c", ["a", "b", "c"]),
        ("./a/./b/", ["a", "b"]),
        ("/etc/passwd", ["etc", "passwd"]),
        ("../../etc/passwd", ["etc", "passwd"]),
        ("a/../../b", ["b"]),
        ("a//b", ["a", "b"]),
        ("./", []),
        ("..", []),
        ("a/b/..", ["a"]),
    ],
)
def test_split_name_confines_to_root(name: str, parts: list[str]) -> None:
    assert split_name(name) == parts


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x1f\x8b\x08\x00", Compression.GZIP),
        (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
        (b"etc/\x00\x00", Compression.NONE),
        (b"", Compression.NONE),
        (b"\x1f", Compression.NONE),
    ],
)
def test_detect_compression(head: bytes, expected: Compression) -> None:
    assert detect_compression(head) is expected


def test_compression_parse_rejects_unknown() -> None:
    from lamina.errors import InvalidArgumentError

    assert Compression.parse("zstd") is Compression.ZSTD
    with pytest.raises(InvalidArgumentError):
        Compression.parse("bzip2")


HEADER_NAMES = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
    min_size=1,
    max_size=99,
).filter(lambda s: len(s.encode()) < 100)


@settings(max_examples=200)
@given(
    name=HEADER_NAMES,
    kind=st.sampled_from(
        [
            tarfile.REGTYPE,
            tarfile.DIRTYPE,
            tarfile.SYMTYPE,
            tarfile.CHRTYPE,
            tarfile.FIFOTYPE,
            tarfile.LNKTYPE,
        ]
    ),
    mode=st.integers(0, 0o7777),
    uid=st.integers(0, 0o7777777),
    size=st.integers(0, 0o77777777777),
    mtime=st.integers(0, 0o77777777777),
    tar_format=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT]),
)
def test_fast_header_parser_matches_tarfile(
    name: str, kind: bytes, mode: int, uid: int, size: int, mtime: int, tar_format: int
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = uid
    info.gid = uid // 2
    info.size = size if kind == tarfile.REGTYPE else 0
    info.mtime = mtime
    info.linkname = "target" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    info.devmajor, info.devminor = (4, 64) if kind == tarfile.CHRTYPE else (0, 0)
    info.uname, info.gname = "user", "group"
    block = info.tobuf(tar_format, "utf-8", "surrogateescape")[:512]
    fast = _FastTarInfo.frombuf(block, "utf-8", "surrogateescape")
    slow = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    for attribute in (
        "name",
        "mode",
        "uid",
        "gid",
        "size",
        "mtime",
        "chksum",
        "type",
        "linkname",
        "uname",
        "gname",
        "devmajor",
        "devminor",
    ):
        assert getattr(fast, attribute) == getattr(slow, attribute), attribute


def test_fast_header_parser_rejects_bad_checksum() -> None:
    block = bytearray(tarfile.TarInfo("a").tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")[:512])
    block[0] = ord("b")
    with pytest.raises(tarfile.HeaderError):
        _FastTarInfo.frombuf(bytes(block), "utf-8", "strict")


def test_mtime_and_xattrs_from_pax_records() -> None:
    info = tarfile.TarInfo("f")
    info.mtime = 12
    info.pax_headers = {
        "mtime": "12.000000001",
        "SCHILY.xattr.user.a": "1",
        "SCHILY.xattr.security.capability": b"\x01\xff".decode("utf-8", "surrogateescape"),
        "LIBARCHIVE.xattr.user.b": "Mg==",
    }
    assert mtime_ns(info) == 12_000_000_001
    assert xattrs(info) == {"user.a": b"1", "security.capability": b"\x01\xff"}
    plain = tarfile.TarInfo("g")
    plain.mtime = 5
    assert mtime_ns(plain) == 5_000_000_000


def _stream(blob: bytes) -> LayerStream:
    stream = LayerStream(io.BytesIO(blob), layer="test")
    stream.start()
    return stream


def _tar(*names: str) -> bytes:
    out = io.BytesIO()
    with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return out.getvalue()


@pytest.mark.parametrize(
    "compress",
    [lambda b: b, gzip.compress, lambda b: zstandard.ZstdCompressor().compress(b)],
    ids=["none", "gzip", "zstd"],
)
def test_iter_members_skips_unread_data(compress: object) -> None:
    blob = compress(_tar("a", "b", "c"))  # type: ignore[operator]
    stream = _stream(blob)
    try:
        names = [m.name for m in iter_members(stream)]
    finally:
        stream.close()
    assert names == ["a", "b", "c"]
    assert stream.compressed_size == len(blob)


def _members_of(blob: bytes) -> list[str]:
    stream = _stream(blob)
    try:
        return [m.name for m in iter_members(stream)]
    finally:
        stream.close()


def test_pax_record_length_overflow_rejected() -> None:
    out = io.BytesIO()
    with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "x" * 60}
        tar.addfile(info)
    blob = bytearray(out.getvalue())
    start = blob.index(b" comment=") - 2
    huge = b"9" * 30 + b" c="
    blob[start : start + len(huge)] = huge
    with pytest.raises(LayerError, match="invalid tar header"):
        _members_of(bytes(blob))


def test_gnu_sparse_map_cut_short_rejected() -> None:
    header = bytearray(tarfile.BLOCKSIZE)
    header[0:1] = b"s"
    for offset, field in ((100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0")):
        header[offset : offset + 8] = field
    header[124:136] = header[136:148] = b"00000000000\0"
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[257:265] = tarfile.GNU_MAGIC
    header[482] = 1  # an extension block of the sparse map follows, but the stream ends
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(LayerError, match="header data ends early"):
        _members_of(bytes(header))


@pytest.mark.parametrize(
    ("records", "what"),
    [
        ({"path": "a\0b"}, "entry name"),
        ({"linkpath": "target\0"}, "link target"),
        ({"SCHILY.xattr.user.a\0b": "v"}, "xattr name"),
    ],
)
def test_nul_in_pax_names_rejected(records: dict[str, str], what: str) -> None:
    out = io.BytesIO()
    with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a")
        info.pax_headers = records
        tar.addfile(info)
    with pytest.raises(LayerError, match=f"the {what} contains a NUL byte"):
        _members_of(out.getvalue())


def test_layer_stream_reports_truncated_data() -> None:
    stream = _stream(b"x" * 100)
    try:
        with pytest.raises(LayerError):
            stream.skip(101)
    finally:
        stream.close()


def test_zstd_tracker_multi_frame_skippable_and_checksum() -> None:
    frames = (
        zstandard.ZstdCompressor(write_checksum=True).compress(b"a" * 1000)
        + b"\x50\x2a\x4d\x18"
        + (3).to_bytes(4, "little")
        + b"xyz"
        + zstandard.ZstdCompressor(write_content_size=False).compress(b"b" * 300_000)
    )
    tracker = ZstdFrameTracker()
    for i in range(0, len(frames), 7):
        tracker.feed(frames[i : i + 7])
    assert tracker.error is None
    assert tracker.complete
    truncated = ZstdFrameTracker()
    truncated.feed(frames[:-1])
    assert not truncated.complete
    garbage = ZstdFrameTracker()
    garbage.feed(frames + b"junk")
    assert garbage.error is not None


def _mixed_archive(global_records: dict[str, str] | None) -> bytes:
    out = io.BytesIO()
    with tarfile.TarFile(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers=global_records
    ) as tar:
        for name, kind, data in [
            ("plain", tarfile.REGTYPE, b"abc"),
            ("dir", tarfile.DIRTYPE, b""),
            ("long/" + "x" * 150, tarfile.REGTYPE, b"long"),
            ("dir/link", tarfile.SYMTYPE, b""),
            ("caps", tarfile.REGTYPE, b"c"),
            ("after", tarfile.REGTYPE, b"z" * 700),
        ]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            info.linkname = "plain" if kind == tarfile.SYMTYPE else ""
            if name == "caps":
                info.pax_headers = {"SCHILY.xattr.user.a": "1", "mtime": "5.5"}
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("global_records", [None, {"mtime": "7", "comment": "c"}])
def test_iter_members_matches_tarfile(global_records: dict[str, str] | None) -> None:
    blob = _mixed_archive(global_records)
    with tarfile.open(fileobj=io.BytesIO(blob)) as reference:
        expected = [
            (m.name, m.type, m.size, m.offset_data, m.mtime, dict(m.pax_headers))
            for m in reference.getmembers()
        ]
    stream = _stream(blob)
    try:
        actual = [
            (m.name, m.type, m.size, m.offset_data, m.mtime, dict(m.pax_headers))
            for m in iter_members(stream)
        ]
    finally:
        stream.close()
    assert actual == expected
