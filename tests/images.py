"""Paths of the test images, built once with scripts/build-test-images.sh when missing.

The images live outside the repository, in $LAMINA_IMAGES, else
${XDG_CACHE_HOME:-~/.cache}/lamina-images, as NAME.oci.tar and
NAME.docker.tar. The first test that needs a missing image runs the build
script, which installs its Debian packages itself and takes a few minutes
for the debian image. A lock file makes parallel test processes wait for
one build instead of starting several.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "scripts" / "build-test-images.sh"
FORMATS = ("oci", "docker")
BUILD_TIMEOUT = 1800


def images_dir() -> Path:
    """Return the folder holding the test image archives."""
    configured = os.environ.get("LAMINA_IMAGES")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lamina-images"


def _built(folder: Path, name: str) -> bool:
    return all((folder / f"{name}.{fmt}.tar").is_file() for fmt in FORMATS)


def image_archive(name: str, fmt: str) -> Path:
    """Return the archive of image NAME in format FMT ("oci" or "docker"), building it if needed."""
    folder = images_dir()
    if not _built(folder, name):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".tests.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _built(folder, name):
                result = subprocess.run(
                    ["bash", str(BUILD_SCRIPT), str(folder)],
                    env={**os.environ, "LAMINA_TEST_IMAGES": name},
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                )
                if result.returncode != 0:
                    pytest.fail(f"{BUILD_SCRIPT} could not build {name}:\n{result.stderr[-4000:]}")
    return folder / f"{name}.{fmt}.tar"


def extract_archive(archive: Path, target: Path) -> Path:
    """Unpack an image tar into TARGET (to edit it into a corrupt variant); return TARGET."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="tar")
    return target
