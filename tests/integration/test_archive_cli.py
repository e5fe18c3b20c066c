"""`lamina snapshots apply / diff / unpack` on both drivers, checked against a generic apply."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest
from hostile_layers import LayerBuilder, apply_generic
from treecompare import assert_trees_equal, snapshot_tree

from lamina import mount as mounting
from lamina.archive import apply_layer
from lamina.cli.archive import register_snapshot_commands
from lamina.cli.common import add_global_options
from lamina.drivers import open_snapshotter
from lamina.errors import FailedPreconditionError, LaminaError


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="lamina")
    add_global_options(parser, suppress=False)
    register_snapshot_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv and out.strip() else {}


def _layers(tmp_path: Path) -> list[Path]:
    base = LayerBuilder().dir("etc").file("etc/os", b"debian").dir("d").file("d/old", b"o")
    base.file("bin/tool", b"tool", mode=0o755)
    top = LayerBuilder().whiteout("d/old").file("d/new", b"n").hardlink("bin/alias", "bin/tool")
    paths = []
    for i, blob in enumerate((base.gzip(), top.zstd())):
        path = tmp_path / f"layer{i}"
        path.write_bytes(blob)
        paths.append(path)
    return paths


@pytest.mark.parametrize("driver", ["overlay", "native"])
def test_unpack_apply_diff(tmp_path: Path, driver: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    common = ["--root", str(root), "--driver", driver, "--json"]
    layer0, layer1 = _layers(tmp_path)

    first = _run([*common, "unpack", "k0", str(layer0)], capsys)
    second = _run([*common, "unpack", "k1", str(layer1), "--parent", str(first["diff_id"])], capsys)
    assert second["name"] == second["diff_id"]

    sn = open_snapshotter(root, driver)
    sn.prepare("k2", str(second["name"]))
    sn.close()
    extra = tmp_path / "extra"
    extra.write_bytes(LayerBuilder().file("etc/motd", b"hi").whiteout("etc/os").tar())
    applied = _run([*common, "apply", "k2", str(extra)], capsys)
    assert applied["layers"][0]["compression"] == "none"  # type: ignore[index]

    expected = tmp_path / "expected"
    apply_generic(expected, [layer0.read_bytes(), layer1.read_bytes(), extra.read_bytes()])
    sn = open_snapshotter(root, driver)
    try:
        with mounting.temporary_mount(sn.mounts("k2")) as view:
            assert_trees_equal(expected, view, mtimes="non-dirs")
    finally:
        sn.close()

    out = tmp_path / "diff.tar"
    summary = _run([*common, "diff", "k2", "-o", str(out), "--compression", "none"], capsys)
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
    assert names == ["etc", "etc/.wh.os", "etc/motd"] or names == ["etc/.wh.os", "etc/motd"]
    rebuilt = tmp_path / "rebuilt"
    apply_generic(rebuilt, [layer0.read_bytes(), layer1.read_bytes()])
    result = apply_layer(io.BytesIO(out.read_bytes()), rebuilt)
    assert result.diff_id == summary["diff_id"]
    assert_trees_equal(snapshot_tree(expected), snapshot_tree(rebuilt))


def test_apply_to_committed_snapshot_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    layer0, _ = _layers(tmp_path)
    result = _run(
        ["--root", str(root), "--json", "unpack", "k0", str(layer0), "--name", "base"], capsys
    )
    assert result["name"] == "base"
    parser = argparse.ArgumentParser()
    add_global_options(parser, suppress=False)
    register_snapshot_commands(parser.add_subparsers())
    args = parser.parse_args(["--root", str(root), "apply", "base", str(layer0)])
    with pytest.raises(FailedPreconditionError):
        args.handler(args)


def test_unpack_failure_removes_active_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    broken = tmp_path / "broken"
    broken.write_bytes(LayerBuilder().file("a", b"x" * 3000).tar()[:1500])
    parser = argparse.ArgumentParser()
    add_global_options(parser, suppress=False)
    register_snapshot_commands(parser.add_subparsers())
    args = parser.parse_args(["--root", str(root), "unpack", "k", str(broken)])
    with pytest.raises(LaminaError):
        args.handler(args)
    sn = open_snapshotter(root)
    try:
        assert [info.name for info in sn.list()] == []
    finally:
        sn.close()
