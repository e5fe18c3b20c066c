"""Mutated tar streams against the layer applier: typed errors only, nothing outside, no hang.

Each example starts from a seed layer that already carries the classic
hazards: names with `..`, a symlink to a sibling folder followed by an entry
through it, a hard link out, whiteouts and long PAX names. It overwrites
bytes and cuts the stream, then applies it with both appliers. The applier may
accept or reject the result, but it must raise nothing except Lamina's own
errors, leave the sibling folder exactly as it was, and finish in time.

LAMINA_FUZZ_EXAMPLES raises the number of examples for a long run.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.archive.apply import apply_layer, apply_layer_to_upper
from lamina.errors import LaminaError

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "120"))
TIME_LIMIT_SECONDS = 20


def _add(archive: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data) if data else None)


def _seed_layer() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
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


SEED = _seed_layer()


def _mutate(seed: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for position, value in changes:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % len(data) :]
    return bytes(data)


def _tree_state(top: Path) -> dict[str, tuple[int, int, bytes]]:
    state: dict[str, tuple[int, int, bytes]] = {}
    for directory, _, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            info = path.lstat()
            state[str(path.relative_to(top))] = (info.st_mode, info.st_nlink, path.read_bytes())
    return state


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"the applier did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check_apply(layer: bytes, overlay: bool) -> None:
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

        with _time_limit(TIME_LIMIT_SECONDS):
            try:
                if overlay:
                    apply_layer_to_upper(io.BytesIO(layer), target, [lower], layer="fuzz")
                else:
                    apply_layer(io.BytesIO(layer), target, layer="fuzz")
            except LaminaError:
                pass

        assert _tree_state(outside) == before
        assert sorted(p.name for p in base.iterdir()) == ["lower", "outside", "target"]
    finally:
        shutil.rmtree(base)


mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=len(SEED) - 1), st.integers(0, 255)),
    max_size=12,
)
cuts = st.none() | st.integers(min_value=0, max_value=len(SEED) - 1)
fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_seed_layer_applies_safely() -> None:
    _check_apply(SEED, overlay=False)
    _check_apply(SEED, overlay=True)


@fuzz_settings
@given(changes=mutations, cut=cuts)
def test_mutated_layer_generic_path(changes: list[tuple[int, int]], cut: int | None) -> None:
    _check_apply(_mutate(SEED, changes, cut), overlay=False)


@fuzz_settings
@given(changes=mutations, cut=cuts)
def test_mutated_layer_overlay_path(changes: list[tuple[int, int]], cut: int | None) -> None:
    _check_apply(_mutate(SEED, changes, cut), overlay=True)
