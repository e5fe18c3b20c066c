"""Find the image to unpack in an archive: its manifest, config and layer blobs.

An OCI image layout (and an oci-archive, its tar) starts at index.json; an
index may point at further indexes (a multi-platform image) and at
manifests, and the platform picks one manifest. A docker-archive starts at
manifest.json, a list of {Config, RepoTags, Layers} entries with file
paths instead of descriptors; its config digest is computed, and the digest
of a layer file is known in advance only when its path names it
(`blobs/sha256/HEX`, or `HEX.tar` as podman writes them).

Every small document read here (index, manifest, config) is checked
against its descriptor's size and digest before it is parsed. Layers are
checked while they are unpacked (lamina.images.unpack).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from lamina.images import oci
from lamina.images.digest import parse_digest, sha256_digest
from lamina.images.errors import (
    DigestMismatchError,
    InvalidImageError,
    PlatformNotFoundError,
)
from lamina.images.source import Source

log = logging.getLogger(__name__)

# Indexes and manifests are small; containerd's content fetcher refuses
# manifests over 4 MiB. Configs of very large histories stay well below 16 MiB.
MAX_DOCUMENT_SIZE = 16 << 20
MAX_INDEX_DEPTH = 4

OCI = "oci"
DOCKER = "docker"

_HEX_TAR = re.compile(r"([a-f0-9]{64})\.tar")
_HEX_JSON = re.compile(r"([a-f0-9]{64})\.json")


@dataclass(frozen=True)
class LayerBlob:
    """One layer of the chosen image: where its blob is and what it must hash to.

    `digest` is None for a docker-archive layer whose path does not name its
    digest; it is computed while the layer is read.
    """

    index: int
    path: str
    digest: str | None
    size: int
    media_type: str
    diff_id: str


@dataclass(frozen=True)
class ResolvedImage:
    """The image an archive holds for one platform."""

    archive_format: str
    name_hint: str
    manifest_digest: str | None
    manifest_media_type: str
    manifest_size: int
    config_digest: str
    config_size: int
    platform: oci.Platform
    layers: tuple[LayerBlob, ...]

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(layer.diff_id for layer in self.layers)

    @property
    def content_size(self) -> int:
        """Bytes of every blob of the image: manifest, config and layers."""
        return self.manifest_size + self.config_size + sum(layer.size for layer in self.layers)

    def docker_manifest(self, layer_digests: list[str]) -> bytes:
        """Return a Docker schema 2 manifest for a docker-archive image.

        A docker-archive has no manifest blob; this one, with the layer
        digests computed during the unpack, gives the image a manifest
        digest as `ctr images import` does.
        """
        document = {
            "schemaVersion": 2,
            "mediaType": oci.DOCKER_MANIFEST,
            "config": {
                "mediaType": oci.DOCKER_CONFIG,
                "digest": self.config_digest,
                "size": self.config_size,
            },
            "layers": [
                {"mediaType": layer.media_type, "digest": digest, "size": layer.size}
                for layer, digest in zip(self.layers, layer_digests, strict=True)
            ],
        }
        return json.dumps(document, separators=(",", ":")).encode()


def read_blob(source: Source, path: str, descriptor: oci.Descriptor, what: str) -> bytes:
    """Read a small blob and check its size and digest against DESCRIPTOR."""
    if not source.exists(path):
        raise InvalidImageError(
            f"{what} {descriptor.digest}: blob is missing from the archive ({path})",
            subject=descriptor.digest,
        )
    size = source.size(path)
    if size != descriptor.size:
        raise DigestMismatchError(
            f"{what} {descriptor.digest}: blob has {size} bytes, its descriptor expects "
            f"{descriptor.size}; the archive is corrupt or truncated",
            subject=descriptor.digest,
        )
    if size > MAX_DOCUMENT_SIZE:
        raise InvalidImageError(
            f"{what} {descriptor.digest}: {size} bytes is larger than the "
            f"{MAX_DOCUMENT_SIZE >> 20} MiB accepted for a document",
            subject=descriptor.digest,
        )
    with source.open(path) as reader:
        data = reader.read()
    algorithm, encoded = parse_digest(descriptor.digest)
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != encoded:
        raise DigestMismatchError(
            f"{what} {descriptor.digest}: blob content hashes to {algorithm}:{actual}; the "
            "archive is corrupt",
            subject=descriptor.digest,
        )
    return data


def blob_path(digest: str) -> str:
    """Return the path of a blob in an OCI image layout."""
    algorithm, encoded = parse_digest(digest)
    return f"blobs/{algorithm}/{encoded}"


def resolve_image(source: Source, platform: oci.Platform) -> ResolvedImage:
    """Return the image for PLATFORM that the archive SOURCE holds."""
    if source.exists("index.json"):
        return _resolve_layout(source, platform)
    if source.exists("manifest.json"):
        return _resolve_docker(source, platform)
    raise InvalidImageError(
        f"{source.description}: neither an OCI image layout (no index.json) nor a "
        "docker-archive (no manifest.json)",
        subject=source.description,
    )


# ---------------------------------------------------------------- OCI layout


@dataclass(frozen=True)
class _Candidate:
    descriptor: oci.Descriptor
    name: str
    platform: oci.Platform | None


def _read_document(
    source: Source, descriptor: oci.Descriptor, what: str
) -> tuple[dict[str, Any], str]:
    data = read_blob(source, blob_path(descriptor.digest), descriptor, what)
    document = oci.load_json(data, f"{what} {descriptor.digest}")
    return document, oci.document_type(document, descriptor.media_type)


def _collect(
    source: Source, entries: list[oci.Descriptor], name: str, depth: int, out: list[_Candidate]
) -> None:
    for entry in entries:
        entry_name = oci.image_name(entry.annotations) or name
        media_type = entry.media_type
        if media_type in oci.MANIFEST_TYPES:
            out.append(_Candidate(entry, entry_name, entry.platform))
            continue
        if media_type and media_type not in oci.INDEX_TYPES:
            log.debug("skipping index entry %s of media type %s", entry.digest, media_type)
            continue
        document, media_type = _read_document(source, entry, "index entry")
        if media_type in oci.MANIFEST_TYPES:
            out.append(_Candidate(entry, entry_name, entry.platform))
        elif media_type in oci.INDEX_TYPES:
            if depth >= MAX_INDEX_DEPTH:
                raise InvalidImageError(
                    f"image index {entry.digest}: indexes nest deeper than {MAX_INDEX_DEPTH}",
                    subject=entry.digest,
                )
            nested = oci.parse_index(document, f"image index {entry.digest}")
            _collect(source, nested, entry_name, depth + 1, out)
        else:
            log.debug("skipping index entry %s of media type %r", entry.digest, media_type)


def _manifest_and_config(
    source: Source, descriptor: oci.Descriptor
) -> tuple[oci.Manifest, oci.ImageConfig]:
    document, media_type = _read_document(source, descriptor, "manifest")
    if media_type not in oci.MANIFEST_TYPES:
        raise InvalidImageError(
            f"manifest {descriptor.digest}: media type {media_type!r} is not an image manifest",
            subject=descriptor.digest,
        )
    manifest = oci.parse_manifest(document, media_type, f"manifest {descriptor.digest}")
    config_document, _ = _read_document(source, manifest.config, "config")
    config = oci.parse_config(config_document, f"config {manifest.config.digest}")
    return manifest, config


def _resolve_layout(source: Source, platform: oci.Platform) -> ResolvedImage:
    with source.open("index.json") as reader:
        index_document = oci.load_json(reader.read(MAX_DOCUMENT_SIZE), "index.json")
    candidates: list[_Candidate] = []
    _collect(source, oci.parse_index(index_document, "index.json"), "", 0, candidates)
    if not candidates:
        raise InvalidImageError(
            f"{source.description}: index.json lists no image manifest",
            subject=source.description,
        )

    matching: list[tuple[_Candidate, oci.Manifest, oci.ImageConfig]] = []
    seen: list[oci.Platform | None] = []
    for candidate in candidates:
        if candidate.platform is not None:
            seen.append(candidate.platform)
            if not platform.matches(candidate.platform):
                continue
        manifest, config = _manifest_and_config(source, candidate.descriptor)
        if candidate.platform is None:
            seen.append(config.platform)
            if not platform.matches(config.platform):
                continue
        matching.append((candidate, manifest, config))
    if not matching:
        raise PlatformNotFoundError(
            f"{source.description}: no image for platform {platform}; the archive has "
            f"{oci.platforms_text(seen)} (choose one with --platform)",
            subject=str(platform),
        )
    digests = {candidate.descriptor.digest for candidate, _, _ in matching}
    if len(digests) > 1:
        log.warning(
            "%s contains %d images for %s; importing the first, %s",
            source.description,
            len(digests),
            platform,
            matching[0][0].descriptor.digest,
        )
    candidate, manifest, config = matching[0]
    return _layout_image(candidate, manifest, config)


def _layout_image(
    candidate: _Candidate, manifest: oci.Manifest, config: oci.ImageConfig
) -> ResolvedImage:
    what = f"manifest {candidate.descriptor.digest}"
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidImageError(
            f"{what}: {len(manifest.layers)} layers but config {manifest.config.digest} lists "
            f"{len(config.diff_ids)} diff ids",
            subject=candidate.descriptor.digest,
        )
    layers = tuple(
        LayerBlob(
            index=i,
            path=blob_path(layer.digest),
            digest=layer.digest,
            size=layer.size,
            media_type=layer.media_type,
            diff_id=diff_id,
        )
        for i, (layer, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True))
    )
    return ResolvedImage(
        archive_format=OCI,
        name_hint=candidate.name,
        manifest_digest=candidate.descriptor.digest,
        manifest_media_type=manifest.media_type,
        manifest_size=candidate.descriptor.size,
        config_digest=manifest.config.digest,
        config_size=manifest.config.size,
        platform=config.platform,
        layers=layers,
    )


# ---------------------------------------------------------------- docker-archive


def _docker_entries(source: Source) -> list[dict[str, Any]]:
    with source.open("manifest.json") as reader:
        data = reader.read(MAX_DOCUMENT_SIZE)
    try:
        entries = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidImageError(
            f"{source.description}: manifest.json is not valid JSON: {err}",
            subject="manifest.json",
        ) from err
    if not isinstance(entries, list) or not entries:
        raise InvalidImageError(
            f"{source.description}: manifest.json is not a non-empty list of images",
            subject="manifest.json",
        )
    for i, entry in enumerate(entries):
        layers = entry.get("Layers") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("Config"), str)
            or not isinstance(layers, list)
            or not all(isinstance(layer, str) for layer in layers)
        ):
            raise InvalidImageError(
                f"{source.description}: manifest.json entry {i} needs a 'Config' path and a "
                "'Layers' list of paths",
                subject="manifest.json",
            )
    return entries


def _named_digest(source: Source, path: str, pattern: re.Pattern[str]) -> str | None:
    """Return the digest a file's path spells, after resolving symlinks."""
    resolved = source.resolve(path)
    parts = resolved.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        digest = f"{parts[1]}:{parts[2]}"
        parse_digest(digest, what=f"blob path {resolved!r}")
        return digest
    match = pattern.fullmatch(posixpath.basename(resolved))
    return f"sha256:{match.group(1)}" if match else None


def _resolve_docker(source: Source, platform: oci.Platform) -> ResolvedImage:
    seen: list[oci.Platform | None] = []
    for entry in _docker_entries(source):
        config_path: str = entry["Config"]
        if not source.exists(config_path):
            raise InvalidImageError(
                f"{source.description}: config file {config_path!r} is missing",
                subject=config_path,
            )
        config_size = source.size(config_path)
        if config_size > MAX_DOCUMENT_SIZE:
            raise InvalidImageError(
                f"{source.description}: config {config_path!r} is larger than "
                f"{MAX_DOCUMENT_SIZE >> 20} MiB",
                subject=config_path,
            )
        with source.open(config_path) as reader:
            config_data = reader.read()
        config_digest = sha256_digest(config_data)
        named = _named_digest(source, config_path, _HEX_JSON)
        if named is not None and named != config_digest:
            raise DigestMismatchError(
                f"config {named}: file {config_path!r} hashes to {config_digest}; the archive "
                "is corrupt",
                subject=named,
            )
        config = oci.parse_config(oci.load_json(config_data, f"config {config_path}"), config_path)
        seen.append(config.platform)
        if not platform.matches(config.platform):
            continue
        return _docker_image(source, entry, config, config_digest, config_size)
    raise PlatformNotFoundError(
        f"{source.description}: no image for platform {platform}; the archive has "
        f"{oci.platforms_text(seen)} (choose one with --platform)",
        subject=str(platform),
    )


def _docker_image(
    source: Source,
    entry: dict[str, Any],
    config: oci.ImageConfig,
    config_digest: str,
    config_size: int,
) -> ResolvedImage:
    paths: list[str] = entry["Layers"]
    if len(paths) != len(config.diff_ids):
        raise InvalidImageError(
            f"{source.description}: manifest.json lists {len(paths)} layers but config "
            f"{config_digest} lists {len(config.diff_ids)} diff ids",
            subject=config_digest,
        )
    layers: list[LayerBlob] = []
    for i, (path, diff_id) in enumerate(zip(paths, config.diff_ids, strict=True)):
        if not source.exists(path):
            raise InvalidImageError(
                f"{source.description}: layer {i} file {path!r} (diff id {diff_id}) is missing",
                subject=path,
            )
        layers.append(
            LayerBlob(
                index=i,
                path=path,
                digest=_named_digest(source, path, _HEX_TAR),
                size=source.size(path),
                media_type="",
                diff_id=diff_id,
            )
        )
    tags = entry.get("RepoTags")
    name = tags[0] if isinstance(tags, list) and tags and isinstance(tags[0], str) else ""
    return ResolvedImage(
        archive_format=DOCKER,
        name_hint=name,
        manifest_digest=None,
        manifest_media_type=oci.DOCKER_MANIFEST,
        manifest_size=0,
        config_digest=config_digest,
        config_size=config_size,
        platform=config.platform,
        layers=tuple(layers),
    )
