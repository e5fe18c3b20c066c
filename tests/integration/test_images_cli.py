"""`lamina images ...` and `lamina rootfs prepare` on a real image, through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from images import image_archive

from lamina.cli import main
from lamina.errors import NotFoundError
from lamina.mount import is_mountpoint, unmount


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_images_commands(
    capsys: pytest.CaptureFixture[str], lamina_root: Path, tmp_path: Path
) -> None:
    root = ["--root", str(lamina_root)]
    archive = str(image_archive("busybox", "docker"))

    status, out, err = run(capsys, *root, "images", "import", archive, "--name", "bb", "--json")
    assert status == 0, err
    imported = json.loads(out)
    assert imported["name"] == "bb"
    assert imported["layers_unpacked"] == 1

    # Not a terminal: progress comes as plain lines on stderr.
    status, out, err = run(capsys, *root, "images", "import", archive, "--name", "bb2")
    assert status == 0
    assert "reused" in err
    assert out.startswith("imported bb2")

    status, out, _ = run(capsys, *root, "images", "import", archive, "--name", "bb3", "--quiet")
    assert status == 0
    assert out == ""

    status, out, _ = run(capsys, *root, "images", "ls")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == ["NAME", "bb", "bb2", "bb3"]

    status, out, _ = run(capsys, *root, "images", "inspect", "bb")
    details = json.loads(out)
    assert details["chain_id"] == imported["chain_id"]
    assert details["layers"][0]["present"] is True

    rootfs = tmp_path / "rootfs"
    status, out, err = run(capsys, *root, "rootfs", "prepare", "bb", "c1", "--mount", str(rootfs))
    assert status == 0, err
    try:
        assert (rootfs / "bin" / "sh").exists()
    finally:
        unmount(rootfs)

    view = tmp_path / "view"
    status, _, err = run(capsys, *root, "images", "mount", "bb", str(view))
    assert status == 0, err
    assert is_mountpoint(view)
    status, _, err = run(capsys, *root, "images", "unmount", str(view))
    assert status == 0, err
    assert not is_mountpoint(view)

    status, out, _ = run(capsys, *root, "images", "rm", "bb", "bb2", "--json")
    assert status == 0
    assert json.loads(out)[1]["removed_snapshots"] == []  # bb3 still needs it
    status, out, _ = run(capsys, *root, "images", "rm", "bb3")
    assert status == 0
    # The container c1 still needs the image's only layer.
    assert out.startswith("bb3: removed, with 0 of its 1 layers; 1 stay while a container")

    status, _, err = run(capsys, *root, "images", "inspect", "bb")
    assert status == NotFoundError.exit_code
    assert err.startswith("lamina: error:")

    status, _, _ = run(capsys, *root, "snapshots", "rm", "c1")
    assert status == 0
    status, out, _ = run(capsys, *root, "images", "prune", "--json")
    assert status == 0
    assert json.loads(out)["removed"] == [imported["chain_id"]]
    status, out, _ = run(capsys, *root, "images", "prune")
    assert status == 0
    assert out == "nothing to prune\n"


def test_import_rejects_bad_options(capsys: pytest.CaptureFixture[str], lamina_root: Path) -> None:
    archive = str(image_archive("busybox", "oci"))
    status, _, _ = run(
        capsys, "--root", str(lamina_root), "images", "import", archive, "--jobs", "0"
    )
    assert status == 3
    status, _, _ = run(
        capsys, "--root", str(lamina_root), "images", "import", archive, "--platform", "linux"
    )
    assert status == 3
    status, _, _ = run(
        capsys, "--root", str(lamina_root), "images", "import", archive, "--platform", "linux/s390x"
    )
    assert status == NotFoundError.exit_code
