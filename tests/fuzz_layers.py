"""What the layer-applier fuzzers share: seed layers and the check of one input.

Both fuzzers (the hypothesis test in the suite and the atheris target for
long runs) hand a byte string to `check_apply`. It applies the bytes with
one of the two appliers into a fresh folder, next to a sibling folder
`outside` and a lower layer. The check fails when the applier raises
anything but Lamina's own errors, changes the sibling folder, creates
anything next to the three folders, leaks a file descriptor or a thread, or
runs past its time limit.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from lamina.archive.apply import apply_layer, apply_layer_to_upper
from lamina.errors import LaminaError

TIME_LIMIT_SECONDS = 20


def _add(archive: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data) if data else None)


def hazard_layer(tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """Build a layer in TAR_FORMAT that carries the classic hazards.

    `..` names, a symlink to the sibling folder and an entry through it, a
    hard link out, whiteouts, an opaque marker, a long name and a FIFO.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        _add(archive, directory)
        _add(archive, tarfile.TarInfo("dir/file"), b"content\n")
        escape = tarfile.TarInfo("escape")
        escape.type = tarfile.SYMTYPE
        escape.linkname = "../outside"
        _add(archive, escape)
        _add(archive, tarfile.TarInfo("escape/through-symlink"), b"should stay inside\n")
        _add(archive, tarfile.TarInfo("../outside/dot-dot"), b"should stay inside\n")
        link = tarfile.TarInfo("hardlink-out")
        link.type = tarfile.LNKTYPE
        link.linkname = "../outside/sentinel"
        _add(archive, link)
        _add(archive, tarfile.TarInfo("dir/.wh.file"))
        _add(archive, tarfile.TarInfo("dir/.wh..wh..opq"))
        _add(archive, tarfile.TarInfo("long/" + "n" * 150 + "/file"), b"pax path\n")
        fifo = tarfile.TarInfo("fifo")
        fifo.type = tarfile.FIFOTYPE
        _add(archive, fifo)
    return buffer.getvalue()


def gnu_tar_layers(work: Path) -> list[bytes]:
    """Write layers with GNU tar in WORK: sparse files, hard links, xattrs, long names.

    One per format GNU tar writes sparse files in (old GNU, and PAX sparse
    0.1 and 1.0), so that the fuzzer starts from every header family the
    applier reads.
    """
    source = work / "source"
    source.mkdir()
    with open(source / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"after a hole\n")
        f.seek(3 << 20)
        f.write(b"end\n")
    (source / "file").write_bytes(b"regular\n")
    os.link(source / "file", source / "hard link")
    os.symlink("file", source / "symlink")
    os.setxattr(source / "file", "user.lamina", b"value")
    deep = source.joinpath(*["d" * 40] * 4)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_bytes(b"long name\n")
    layers = []
    for tar_format, version in (("gnu", None), ("posix", "0.1"), ("posix", "1.0")):
        out = work / f"{tar_format}-{version}.tar"
        command = ["tar", "-c", "--sparse", f"--format={tar_format}"]
        if version:
            # xattrs need PAX records, which the old GNU format lacks.
            command += [f"--sparse-version={version}", "--xattrs"]
        command += ["-f", str(out), "-C", str(source), "."]
        subprocess.run(command, check=True)
        layers.append(out.read_bytes())
    return layers


def _tree_state(top: Path) -> dict[str, tuple[int, int, bytes]]:
    state: dict[str, tuple[int, int, bytes]] = {}
    for directory, _, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            info = path.lstat()
            state[str(path.relative_to(top))] = (info.st_mode, info.st_nlink, path.read_bytes())
    return state


@contextmanager
def _time_limit(seconds: int | None) -> Iterator[None]:
    if seconds is None:
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"the applier did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def check_apply(layer: bytes, overlay: bool, time_limit: int | None = TIME_LIMIT_SECONDS) -> None:
    """Apply LAYER with one applier and assert that it stayed inside and cleaned up.

    TIME_LIMIT is in seconds, enforced with SIGALRM; None leaves timing to the
    caller (libFuzzer keeps SIGALRM for its own -timeout).
    """
    base = Path(tempfile.mkdtemp(prefix="lamina-fuzz-"))
    try:
        target = base / "target"
        outside = base / "outside"
        lower = base / "lower"
        for folder in (target, outside, lower / "dir"):
            folder.mkdir(parents=True)
        (outside / "sentinel").write_bytes(b"sentinel\n")
        (lower / "dir" / "lower-file").write_bytes(b"lower\n")
        before = _tree_state(outside)
        fds = _open_fds()
        threads = threading.active_count()

        with _time_limit(time_limit):
            try:
                if overlay:
                    apply_layer_to_upper(io.BytesIO(layer), target, [lower], layer="fuzz")
                else:
                    apply_layer(io.BytesIO(layer), target, layer="fuzz")
            except LaminaError:
                pass

        assert _tree_state(outside) == before, "the applier changed the sibling folder"
        assert sorted(p.name for p in base.iterdir()) == ["lower", "outside", "target"]
        assert _open_fds() <= fds, f"file descriptors left open: {_open_fds() - fds}"
        assert threading.active_count() <= threads, "the applier left a thread running"
    finally:
        shutil.rmtree(base)
