"""Fixtures shared by every test: a fresh store root and mount hygiene.

Every test works under its own tmp_path. After each test, anything still
mounted below tmp_path is unmounted (and reported as a failure of the test
that left it), and when the test failed the tree of tmp_path is printed to
help the reader see what was on disk.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from lamina.mount import mounts_under, unmount


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def lamina_root(tmp_path: Path) -> Path:
    """A root directory for a new snapshotter store."""
    root = tmp_path / "root"
    root.mkdir()
    return root


def _tree_lines(top: Path, limit: int = 200) -> Iterator[str]:
    count = 0
    for directory, subdirs, files in os.walk(top):
        subdirs.sort()
        depth = Path(directory).relative_to(top).parts
        yield "  " * len(depth) + (Path(directory).name or str(top)) + "/"
        for name in sorted(files):
            yield "  " * (len(depth) + 1) + name
            count += 1
            if count >= limit:
                yield "  ... (more entries)"
                return


@pytest.fixture(autouse=True)
def _unmount_leftovers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    yield
    left = mounts_under(tmp_path)
    for target in left:
        unmount(target)
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        print(f"\n--- tree of {tmp_path} after the failure ---")
        for line in _tree_lines(tmp_path):
            print(line)
    if left:
        pytest.fail(f"test left {len(left)} mounts under {tmp_path}: {[str(p) for p in left]}")
