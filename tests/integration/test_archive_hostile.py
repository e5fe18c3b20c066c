"""The corpus of hostile layers: every hazard is confined inside the target or rejected.

Each case runs on both apply paths: the generic one (layers applied in
order into one directory) and the overlay fast path (each layer into its
own upper directory over the previous ones). Next to the target sits an
`outside` folder with a sentinel file; after the apply it must be exactly
as before, whatever the layer did.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hostile_layers import (
    HOSTILE,
    HostileCase,
    LayerBuilder,
    apply_generic,
    apply_overlay_stack,
    merged_view,
)
from treecompare import assert_trees_equal, snapshot_tree

from lamina.archive import LayerError, apply_layer


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"original")
    (outside / "victim").write_bytes(b"keep me")
    os.chmod(outside, 0o755)
    return outside


def _confined_paths(case: HostileCase, outside: Path) -> list[str]:
    return [p.replace("OUT", str(outside).lstrip("/"), 1) for p in case.confined_to]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_layer_generic(case: HostileCase, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    before = snapshot_tree(outside, include_root=True)
    target = tmp_path / "target"
    layers = [build(str(outside)).tar() for build in case.layers]

    if case.rejected:
        apply_generic(target, layers[:-1])
        with pytest.raises(LayerError) as caught:
            apply_layer(io.BytesIO(layers[-1]), target, layer="hostile")
        assert caught.value.layer == "hostile"
        assert caught.value.entry is not None
    else:
        apply_generic(target, layers)
        for rel in _confined_paths(case, outside):
            assert os.path.lexists(target / rel), f"{rel} not written inside the target"

    assert_trees_equal(before, snapshot_tree(outside, include_root=True), mtimes="all")


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.name)
def test_hostile_layer_overlay(case: HostileCase, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    before = snapshot_tree(outside, include_root=True)
    layers = [build(str(outside)).tar() for build in case.layers]

    if case.rejected:
        with pytest.raises(LayerError):
            apply_overlay_stack(tmp_path / "stack", layers)
    else:
        uppers = apply_overlay_stack(tmp_path / "stack", layers)
        with merged_view(uppers, tmp_path / "merged") as view:
            for rel in _confined_paths(case, outside):
                assert os.path.lexists(view / rel), f"{rel} not written inside the target"

    assert_trees_equal(before, snapshot_tree(outside, include_root=True), mtimes="all")


def test_symlink_parent_lands_inside_target(tmp_path: Path) -> None:
    """A link made by an earlier entry redirects a later entry within the target."""
    target = tmp_path / "target"
    layer = LayerBuilder().dir("usr").dir("usr/lib").symlink("lib", "usr/lib").file("lib/x", b"1")
    apply_generic(target, [layer.tar()])
    assert (target / "usr/lib/x").read_bytes() == b"1"
    assert os.readlink(target / "lib") == "usr/lib"


def test_whiteout_through_symlink_hits_target_copy(tmp_path: Path) -> None:
    """A whiteout whose parent is a link to an absolute path deletes the copy inside the target."""
    outside = _outside(tmp_path)
    target = tmp_path / "target"
    first = (
        LayerBuilder()
        .symlink("evil", str(outside))
        .file(str(outside).lstrip("/") + "/victim", b"inside copy")
    )
    second = LayerBuilder().whiteout("evil/victim")
    apply_generic(target, [first.tar(), second.tar()])
    assert not (target / str(outside).lstrip("/") / "victim").exists()
    assert (outside / "victim").read_bytes() == b"keep me"
