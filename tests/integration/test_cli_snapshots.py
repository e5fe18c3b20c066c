"""The `lamina` command as a user runs it: snapshot commands, mounts and error reporting.

Every test runs the real command in a subprocess (`python -m lamina`, and
the installed `lamina` console script once) on a root under tmp_path. The
assertions check structure (columns, JSON fields, exit statuses, one line
per error) rather than wording.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lamina.errors import (
    USAGE_EXIT_CODE,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from lamina.mount import mounts_under, unmount


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return self.stdout.splitlines()


@dataclass(frozen=True)
class Lamina:
    """Runs `python -m lamina --root ROOT ...` and returns what it printed."""

    root: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True, root: bool = True) -> Result:
        command = [sys.executable, "-m", "lamina"]
        if root:
            command += ["--root", str(self.root)]
        done = subprocess.run(
            [*command, *args], capture_output=True, text=True, env=self.env, timeout=60
        )
        result = Result(done.returncode, done.stdout, done.stderr)
        if check:
            assert result.returncode == 0, f"lamina {shlex.join(args)} failed:\n{result.stderr}"
        return result


@pytest.fixture
def lamina(tmp_path: Path) -> Lamina:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    return Lamina(tmp_path / "root", env)


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    for target in mounts_under(path):
        unmount(target)


def table(result: Result) -> list[list[str]]:
    """Split a table printed with aligned columns into rows of cells."""
    return [line.split() for line in result.lines()]


def assert_one_line_error(result: Result, exit_code: int) -> None:
    assert result.returncode == exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("lamina")


def build_stack(lamina: Lamina, mount_dir: Path) -> None:
    """Create base (Committed, one file), active on base and view on base."""
    lamina("snapshots", "prepare", "base-active")
    lamina("mount", "base-active", str(mount_dir))
    try:
        (mount_dir / "hello").write_text("hello from base\n")
    finally:
        lamina("umount", str(mount_dir))
    lamina("snapshots", "commit", "base", "base-active", "--label", "role=base")
    lamina("snapshots", "prepare", "active", "base", "--label", "role=work")
    lamina("snapshots", "view", "view", "base")


# ---------------------------------------------------------------- lifecycle


def test_help_lists_commands(lamina: Lamina) -> None:
    top = lamina("--help", root=False)
    for command in ("snapshots", "mount", "umount"):
        assert command in top.stdout
    group = lamina("snapshots", "--help", root=False)
    for command in (
        "prepare",
        "view",
        "commit",
        "ls",
        "info",
        "usage",
        "rm",
        "tree",
        "mounts",
        "label",
        "cleanup",
    ):
        assert command in group.stdout


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lamina"
    assert script.exists(), "the lamina console script is not installed"
    done = subprocess.run(
        [str(script), "--root", str(tmp_path / "root"), "snapshots", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["KEY", "PARENT", "KIND"]


def test_lifecycle_through_mounts(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)
    lamina("mount", "active", str(mount_dir))
    try:
        assert (mount_dir / "hello").read_text() == "hello from base\n"
        (mount_dir / "second").write_text("second layer\n")
    finally:
        lamina("umount", str(mount_dir))
    lamina("snapshots", "commit", "top", "active")

    lamina("mount", "view", str(mount_dir))
    try:
        assert sorted(os.listdir(mount_dir)) == ["hello"]
        with pytest.raises(OSError):
            (mount_dir / "new").write_text("read-only")
    finally:
        lamina("umount", str(mount_dir))

    lamina("snapshots", "view", "top-view", "top")
    lamina("mount", "top-view", str(mount_dir))
    try:
        assert sorted(os.listdir(mount_dir)) == ["hello", "second"]
    finally:
        lamina("umount", str(mount_dir))
    assert mounts_under(mount_dir) == []


def test_ls_and_list_alias(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)
    rows = table(lamina("snapshots", "ls"))
    assert rows[0] == ["KEY", "PARENT", "KIND"]
    assert sorted(rows[1:]) == [
        ["active", "base", "Active"],
        ["base", "Committed"],
        ["view", "base", "View"],
    ]
    assert lamina("snapshots", "list").stdout == lamina("snapshots", "ls").stdout


def test_ls_filters(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)

    def keys(*filters: str) -> list[str]:
        args = [arg for f in filters for arg in ("--filter", f)]
        return sorted(row[0] for row in table(lamina("snapshots", "ls", *args))[1:])

    assert keys("kind==committed") == ["base"]
    assert keys("parent==base") == ["active", "view"]
    assert keys("labels.role==work") == ["active"]
    assert keys("labels.role") == ["active", "base"]
    assert keys("kind==view", "kind==committed") == ["base", "view"]
    assert keys("kind==active,labels.role==base") == []
    assert keys("name~=^(a|v)") == ["active", "view"]
    assert_one_line_error(
        lamina("snapshots", "ls", "--filter", "name==", check=False),
        InvalidArgumentError.exit_code,
    )


def test_ls_json(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)
    listed = json.loads(lamina("--json", "snapshots", "ls").stdout)
    by_name = {entry["Name"]: entry for entry in listed}
    assert set(by_name) == {"base", "active", "view"}
    assert by_name["active"]["Kind"] == "Active"
    assert by_name["active"]["Parent"] == "base"
    assert by_name["base"]["Labels"] == {"role": "base"}
    # Options also work after the command, as ctr takes them.
    after = json.loads(lamina("snapshots", "ls", "--json").stdout)
    assert after == listed


def test_info_json(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)
    info = json.loads(lamina("snapshots", "info", "active").stdout)
    assert info["Name"] == "active"
    assert info["Kind"] == "Active"
    assert info["Parent"] == "base"
    assert info["Labels"] == {"role": "work"}
    assert info["Created"]
    assert info["Updated"] >= info["Created"]
    base = json.loads(lamina("snapshots", "info", "base").stdout)
    assert base["Kind"] == "Committed"
    assert "Parent" not in base or base["Parent"] == ""


def test_usage_human_bytes_and_total(lamina: Lamina, mount_dir: Path) -> None:
    lamina("snapshots", "prepare", "big")
    lamina("mount", "big", str(mount_dir))
    try:
        (mount_dir / "data").write_bytes(os.urandom(3 * 1024 * 1024))
    finally:
        lamina("umount", str(mount_dir))
    lamina("snapshots", "commit", "big-layer", "big")
    lamina("snapshots", "prepare", "small", "big-layer")

    rows = table(lamina("snapshots", "usage", "-b"))
    assert rows[0] == ["KEY", "SIZE", "INODES"]
    sizes = {row[0]: (int(row[1]), int(row[2])) for row in rows[1:]}
    assert set(sizes) == {"big-layer", "small", "TOTAL"}
    assert sizes["big-layer"][0] >= 3 * 1024 * 1024
    assert sizes["TOTAL"][0] == sizes["big-layer"][0] + sizes["small"][0]
    assert sizes["TOTAL"][1] == sizes["big-layer"][1] + sizes["small"][1]

    human = table(lamina("snapshots", "usage"))
    human_sizes = {row[0]: row[1:] for row in human[1:]}
    value, unit = human_sizes["big-layer"][:2]
    assert unit == "MiB"
    assert 3.0 <= float(value) < 3.2
    assert human_sizes["TOTAL"][1] in ("MiB", "KiB")

    one = table(lamina("snapshots", "usage", "-b", "small"))
    assert [row[0] for row in one[1:]] == ["small", "TOTAL"]

    as_json = json.loads(lamina("--json", "snapshots", "usage").stdout)
    assert as_json["total"]["size"] == sizes["TOTAL"][0]
    assert as_json["total"]["inodes"] == sizes["TOTAL"][1]


@pytest.mark.parametrize("command", ["rm", "remove", "del", "delete"])
def test_rm_aliases(lamina: Lamina, command: str) -> None:
    lamina("snapshots", "prepare", "one")
    lamina("snapshots", "prepare", "two")
    lamina("snapshots", "prepare", "keep")
    lamina("snapshots", command, "one", "two")
    assert [row[0] for row in table(lamina("snapshots", "ls"))[1:]] == ["keep"]


def test_rm_continues_after_error(lamina: Lamina) -> None:
    lamina("snapshots", "prepare", "first")
    lamina("snapshots", "prepare", "last")
    result = lamina("snapshots", "rm", "first", "missing", "last", check=False)
    assert_one_line_error(result, NotFoundError.exit_code)
    assert table(lamina("snapshots", "ls"))[1:] == []


def test_tree(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)
    lamina("snapshots", "prepare", "lone")
    lines = lamina("snapshots", "tree").lines()
    names = [line.replace("\\_", "").strip() for line in lines]
    assert sorted(names) == ["active", "base", "lone", "view"]
    depth = {name: len(line) - len(line.lstrip()) for name, line in zip(names, lines, strict=True)}
    assert depth["base"] == depth["lone"] == 0
    assert depth["active"] > 0
    assert depth["view"] > 0
    # Children follow their parent.
    assert names.index("base") < names.index("active")
    assert names.index("base") < names.index("view")


@pytest.mark.parametrize("command", ["mounts", "m"])
@pytest.mark.parametrize("key", ["active", "view"])
def test_mounts_prints_working_command(
    lamina: Lamina, mount_dir: Path, tmp_path: Path, command: str, key: str
) -> None:
    build_stack(lamina, mount_dir)
    target = tmp_path / "by-hand"
    target.mkdir()
    printed = lamina("snapshots", command, str(target), key).lines()
    assert printed
    assert all(shlex.split(line)[0] == "mount" for line in printed)
    assert all(shlex.split(line)[-1] == str(target) for line in printed)
    try:
        for line in printed:
            subprocess.run(shlex.split(line), check=True, capture_output=True, timeout=30)
        assert (target / "hello").read_text() == "hello from base\n"
    finally:
        for mounted in mounts_under(target):
            unmount(mounted)


def test_prepare_target_prints_command(lamina: Lamina, tmp_path: Path) -> None:
    target = tmp_path / "t"
    printed = lamina("snapshots", "prepare", "k", "--target", str(target)).lines()
    assert len(printed) == 1
    assert shlex.split(printed[0])[0] == "mount"
    assert shlex.split(printed[0])[-1] == str(target)
    mounts = json.loads(lamina("--json", "snapshots", "mounts", str(target), "k").stdout)
    assert mounts[0]["type"] == "bind"
    assert "rw" in mounts[0]["options"]


def test_label(lamina: Lamina) -> None:
    lamina("snapshots", "prepare", "k", "--label", "a=1", "--label", "b=2")
    printed = lamina("snapshots", "label", "k", "c=3", "a=").lines()
    assert sorted(printed) == ["b=2", "c=3"]
    info = json.loads(lamina("snapshots", "info", "k").stdout)
    assert info["Labels"] == {"b": "2", "c": "3"}
    assert sorted(lamina("snapshots", "label", "k").lines()) == ["b=2", "c=3"]
    assert_one_line_error(
        lamina("snapshots", "label", "k", "no-equals-sign", check=False),
        InvalidArgumentError.exit_code,
    )
    assert_one_line_error(
        lamina("snapshots", "label", "missing", "a=1", check=False), NotFoundError.exit_code
    )


def test_cleanup_reports_orphans(lamina: Lamina) -> None:
    lamina("snapshots", "prepare", "k")
    orphan = lamina.root / "snapshots" / ".new-0123456789abcdef"
    (orphan / "fs").mkdir(parents=True)
    printed = lamina("snapshots", "cleanup").lines()
    assert len(printed) == 1
    assert printed[0].endswith(str(orphan))
    assert not orphan.exists()
    assert lamina("snapshots", "cleanup").stdout == ""
    assert json.loads(lamina("--json", "snapshots", "cleanup").stdout) == {"removed": []}
    assert [row[0] for row in table(lamina("snapshots", "ls"))[1:]] == ["k"]


def test_root_from_environment(lamina: Lamina) -> None:
    env = {**lamina.env, "LAMINA_ROOT": str(lamina.root)}
    done = subprocess.run(
        [sys.executable, "-m", "lamina", "snapshots", "prepare", "from-env"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [row[0] for row in table(lamina("snapshots", "ls"))[1:]] == ["from-env"]


def test_native_driver_root(tmp_path: Path, mount_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
    native = Lamina(tmp_path / "native-root", env)
    native("--driver", "native", "snapshots", "prepare", "a")
    native("mount", "a", str(mount_dir))
    try:
        (mount_dir / "f").write_text("x")
    finally:
        native("umount", str(mount_dir))
    native("snapshots", "commit", "c", "a")
    # Later commands find the driver from the root itself.
    native("snapshots", "prepare", "b", "c")
    assert (
        json.loads(native("--json", "snapshots", "mounts", "/x", "b").stdout)[0]["type"] == "bind"
    )
    assert_one_line_error(
        native("--driver", "overlay", "snapshots", "ls", check=False),
        FailedPreconditionError.exit_code,
    )


# ---------------------------------------------------------------- errors


ERROR_CASES = [
    ("missing-info", ["snapshots", "info", "missing"], NotFoundError.exit_code),
    ("missing-parent", ["snapshots", "prepare", "x", "missing"], NotFoundError.exit_code),
    ("missing-commit", ["snapshots", "commit", "c", "missing"], NotFoundError.exit_code),
    ("missing-mounts", ["snapshots", "mounts", "/x", "missing"], NotFoundError.exit_code),
    ("existing-key", ["snapshots", "prepare", "active"], AlreadyExistsError.exit_code),
    ("existing-view", ["snapshots", "view", "base", ""], AlreadyExistsError.exit_code),
    ("existing-name", ["snapshots", "commit", "base", "active"], AlreadyExistsError.exit_code),
    ("remove-parent", ["snapshots", "rm", "base"], FailedPreconditionError.exit_code),
    ("commit-view", ["snapshots", "commit", "c", "view"], FailedPreconditionError.exit_code),
    ("mounts-committed", ["snapshots", "mounts", "/x", "base"], FailedPreconditionError.exit_code),
    (
        "bad-label",
        ["snapshots", "prepare", "x", "--label", "novalue"],
        InvalidArgumentError.exit_code,
    ),
    (
        "huge-label",
        ["snapshots", "prepare", "x", "--label", "a=" + "v" * 5000],
        InvalidArgumentError.exit_code,
    ),
    ("empty-key", ["snapshots", "prepare", ""], InvalidArgumentError.exit_code),
    ("bad-filter", ["snapshots", "ls", "--filter", "labels."], InvalidArgumentError.exit_code),
    ("unknown-command", ["snapshots", "explode"], USAGE_EXIT_CODE),
    ("missing-argument", ["snapshots", "commit", "only-name"], USAGE_EXIT_CODE),
]


def test_error_exit_codes(lamina: Lamina, mount_dir: Path) -> None:
    build_stack(lamina, mount_dir)
    before = lamina("snapshots", "ls").stdout
    for case, args, exit_code in ERROR_CASES:
        result = lamina(*args, check=False)
        assert result.returncode == exit_code, (case, result.stderr)
        assert "Traceback" not in result.stderr, case
        if exit_code != USAGE_EXIT_CODE:
            assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
    # None of the failed commands changed anything.
    assert lamina("snapshots", "ls").stdout == before


def test_error_distinct_exit_codes() -> None:
    codes = [
        NotFoundError.exit_code,
        AlreadyExistsError.exit_code,
        FailedPreconditionError.exit_code,
        InvalidArgumentError.exit_code,
        USAGE_EXIT_CODE,
    ]
    assert len(set(codes)) == len(codes)
    assert 0 not in codes


def test_mount_errors(lamina: Lamina, tmp_path: Path) -> None:
    lamina("snapshots", "prepare", "k")
    assert_one_line_error(
        lamina("mount", "k", str(tmp_path / "does-not-exist"), check=False),
        NotFoundError.exit_code,
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    result = lamina("umount", str(plain), check=False)
    assert result.returncode != 0
    assert_one_line_error(result, result.returncode)


def test_debug_shows_traceback(lamina: Lamina) -> None:
    quiet = lamina("snapshots", "info", "missing", check=False)
    assert_one_line_error(quiet, NotFoundError.exit_code)
    loud = lamina("--log-level", "debug", "snapshots", "info", "missing", check=False)
    assert loud.returncode == NotFoundError.exit_code
    assert "Traceback" in loud.stderr
