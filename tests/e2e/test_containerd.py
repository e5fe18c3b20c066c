"""containerd runs images and containers on Lamina through `lamina serve`.

Each test works in its own containerd namespace, so it lists only its own
images and snapshots although the containerd and `lamina serve` processes
are shared by the session. containerd prefixes the keys it sends to a
proxy snapshotter with the namespace ("NAMESPACE/N/key").
"""

from __future__ import annotations

import json

import pytest
from containerd_stack import Stack, image_archive, keys_in_namespace, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN_SCRIPT = "echo hello > /f && cat /f && echo line"


def _list_rows(output: str) -> list[list[str]]:
    """Split the table `ctr snapshots ls` prints into rows of KEY, PARENT, KIND."""
    rows = []
    for line in output.splitlines()[1:]:
        # KEY may contain spaces, so columns are cut from the right: KIND is
        # one word, and PARENT is empty or a chain id without spaces.
        parts = line.split()
        if not parts:
            continue
        kind = parts[-1]
        rest = line.rstrip()[: -len(kind)].rstrip()
        rows.append([rest, kind])
    return rows


def test_proxy_plugin_loaded(stack: Stack) -> None:
    rows = [line.split() for line in stack.containerd.ctr("plugins", "ls").stdout.splitlines()]
    assert ["io.containerd.snapshotter.v1", "lamina", "-", "ok"] in rows


@pytest.mark.parametrize("image", ["busybox", "debian"])
def test_import_and_run(stack: Stack, image: str) -> None:
    namespace = f"run-{image}"
    assert image_archive(image).exists(), f"missing reference image {image_archive(image)}"
    ref = stack.import_image(image, namespace)

    listed = stack.containerd.ctr("images", "ls", "--quiet", namespace=namespace).stdout
    assert ref in listed.split()
    committed = keys_in_namespace(stack.lamina_keys(), namespace)
    assert committed, "import made no snapshots in Lamina"
    with stack.lamina.client() as client:
        kinds = {str(client.stat(key).kind) for key in committed}
    assert kinds == {"Committed"}

    result = stack.containerd.ctr(
        "run",
        "--snapshotter",
        "lamina",
        "--rm",
        ref,
        f"{image}-hello",
        "sh",
        "-c",
        RUN_SCRIPT,
        namespace=namespace,
    )
    assert result.stdout.splitlines() == ["hello", "line"]

    # --rm removed the container; containerd removes its active snapshot
    # from the proxy in its next garbage collection, shortly after.
    def only_committed_left() -> None:
        assert keys_in_namespace(stack.lamina_keys(), namespace) == committed

    wait_until(only_committed_left)


def test_snapshot_commands(stack: Stack) -> None:
    namespace = "snapshot-cli"
    ctr = stack.containerd
    stack.import_image("busybox", namespace)

    rows = _list_rows(ctr.snapshots("ls", namespace=namespace))
    assert rows, "ctr snapshots ls listed nothing after import"
    assert {kind for _, kind in rows} == {"Committed"}
    top = rows[0][0].split()[0]

    key = "work dir/with spaces/1"
    mounts = json.loads(ctr.snapshots("prepare", "--mounts", key, top, namespace=namespace))
    assert [m["Type"] for m in mounts] == ["overlay"]
    assert any(option.startswith("upperdir=") for option in mounts[0]["Options"])
    listed_keys = [name for name, _ in _list_rows(ctr.snapshots("ls", namespace=namespace))]
    assert any(name.startswith(key) for name in listed_keys)

    info = json.loads(ctr.snapshots("info", key, namespace=namespace))
    assert info["Name"] == key
    assert info["Parent"] == top
    assert info["Kind"] == "Active"

    ctr.snapshots("label", key, "example.com/owner=e2e", namespace=namespace)
    info = json.loads(ctr.snapshots("info", key, namespace=namespace))
    assert info["Labels"]["example.com/owner"] == "e2e"
    ctr.snapshots("label", key, "example.com/owner=", namespace=namespace)
    info = json.loads(ctr.snapshots("info", key, namespace=namespace))
    assert "example.com/owner" not in info.get("Labels", {})

    # containerd keeps ordinary labels itself and passes only labels under
    # containerd.io/snapshot/ on to the snapshotter, as Update requests.
    (lamina_key,) = [name for name in stack.lamina_keys() if name.endswith(f"/{key}")]
    assert lamina_key.startswith(f"{namespace}/")
    ctr.snapshots("label", key, "containerd.io/snapshot/e2e=passed", namespace=namespace)
    with stack.lamina.client() as client:
        assert client.stat(lamina_key).labels["containerd.io/snapshot/e2e"] == "passed"
        assert "example.com/owner" not in client.stat(lamina_key).labels

    usage = ctr.snapshots("usage", "-b", top, namespace=namespace)
    size_column = usage.splitlines()[1].split()[1]
    assert int(size_column) > 0

    tree = ctr.snapshots("tree", namespace=namespace)
    assert top in tree
    assert key in tree

    # A parent with a child cannot be removed (containerd checks its own
    # records before it calls the proxy).
    refused = ctr.ctr(
        "snapshots", "--snapshotter", "lamina", "rm", top, namespace=namespace, check=False
    )
    assert refused.returncode != 0
    assert "precondition" in refused.stderr.lower()

    ctr.snapshots("rm", key, namespace=namespace)
    missing = ctr.ctr(
        "snapshots", "--snapshotter", "lamina", "info", key, namespace=namespace, check=False
    )
    assert missing.returncode != 0
    assert "not found" in missing.stderr.lower()

    # containerd removes the snapshot from the proxy in its garbage
    # collection, which `snapshots rm` triggers without waiting for it.
    def removed_from_lamina() -> None:
        assert not any(name.endswith(f"/{key}") for name in stack.lamina_keys())

    wait_until(removed_from_lamina)


def test_gc_removes_snapshots(stack: Stack) -> None:
    namespace = "gc"
    ctr = stack.containerd
    ref = stack.import_image("busybox", namespace)
    ctr.ctr("containers", "create", "--snapshotter", "lamina", ref, "gc-box", namespace=namespace)

    keys = keys_in_namespace(stack.lamina_keys(), namespace)
    assert any(key.endswith("/gc-box") for key in keys), keys

    ctr.ctr("containers", "rm", "gc-box", namespace=namespace)
    ctr.ctr("images", "rm", "--sync", ref, namespace=namespace)

    # `images rm --sync` waits for containerd's garbage collection, which
    # removes the snapshots through Lamina's Remove. The check retries
    # briefly in case the collector ran once more after the call returned.
    def no_keys_left() -> None:
        assert keys_in_namespace(stack.lamina_keys(), namespace) == set()

    wait_until(no_keys_left)


def test_restart_lamina_serve(stack: Stack) -> None:
    namespace = "restart"
    ctr = stack.containerd
    ref = stack.import_image("busybox", namespace)
    before = ctr.snapshots("ls", namespace=namespace)
    keys_before = keys_in_namespace(stack.lamina_keys(), namespace)

    assert stack.lamina.stop() == 0
    assert not stack.lamina.socket.exists()
    stack.lamina.start()

    # containerd's connection to the proxy reconnects on its own; the first
    # calls may still meet the backoff of the broken connection.
    def listed_again() -> None:
        assert ctr.snapshots("ls", namespace=namespace, check=False) == before

    wait_until(listed_again)
    assert keys_in_namespace(stack.lamina_keys(), namespace) == keys_before

    result = ctr.ctr(
        "run",
        "--snapshotter",
        "lamina",
        "--rm",
        ref,
        "after-restart",
        "sh",
        "-c",
        RUN_SCRIPT,
        namespace=namespace,
    )
    assert result.stdout.splitlines() == ["hello", "line"]
