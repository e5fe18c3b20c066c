"""OCI and Docker image documents: descriptors, indexes, manifests, configs, platforms.

Only the fields an unpack needs are parsed. Every other field is ignored,
as the OCI image-spec requires of readers. Docker's schema 2 media types are
accepted beside the OCI ones because their documents have the same shape.
"""

from __future__ import annotations

import json
import platform as host_platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import InvalidArgumentError, UnimplementedError
from lamina.images.digest import parse_digest
from lamina.images.errors import InvalidImageError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# Layer media types Lamina unpacks; the compression itself is detected from
# the bytes. "foreign" and "nondistributable" layers are ordinary layers
# that a registry need not serve, so an archive that contains them unpacks.
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

# Go's GOARCH names, which OCI platforms use, for the machine names Python reports.
_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    """An OCI platform: operating system, architecture and optional variant."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse "os/arch" or "os/arch/variant", as `ctr --platform` takes them."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgumentError(
                f"invalid platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT, "
                "such as linux/amd64 or linux/arm/v7",
                subject=text,
            )
        os_name, arch = parts[0].lower(), parts[1].lower()
        variant = parts[2].lower() if len(parts) == 3 else ""
        arch, variant = _normalize_arch(arch, variant)
        return cls(os_name, arch, variant)

    @classmethod
    def host(cls) -> Platform:
        """Return the platform of this machine."""
        machine = host_platform.machine().lower()
        arch, variant = _MACHINE_TO_ARCH.get(machine, (machine, ""))
        return cls("linux", arch, variant)

    def matches(self, other: Platform) -> bool:
        """Return whether an image built for OTHER runs as this requested platform.

        An empty variant in the request accepts any variant.
        """
        other_arch, other_variant = _normalize_arch(other.architecture, other.variant)
        if (self.os, self.architecture) != (other.os.lower(), other_arch):
            return False
        return not self.variant or self.variant == other_variant


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    # As containerd's platforms package does: arm64 without a variant is v8,
    # and x86_64/aarch64 are spelled as Go spells them.
    if arch in ("x86_64", "x86-64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        return "arm64", "" if variant in ("", "v8") else variant
    return arch, variant


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: media type, digest and size of one blob."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and its layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config an unpack needs."""

    platform: Platform
    diff_ids: tuple[str, ...]


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Parse DATA as a JSON object; InvalidImageError naming WHAT otherwise."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidImageError(f"{what} is not valid JSON: {err}", subject=what) from err
    if not isinstance(document, dict):
        raise InvalidImageError(f"{what} is not a JSON object", subject=what)
    return document


def _field(document: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidImageError(
            f"{what}: field {name!r} is missing or not a {kind.__name__}", subject=what
        )
    return value


def _platform(value: object, what: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidImageError(f"{what}: field 'platform' is not an object", subject=what)
    os_name = value.get("os")
    arch = value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        raise InvalidImageError(f"{what}: platform without 'os' or 'architecture'", subject=what)
    variant = value.get("variant")
    arch, variant = _normalize_arch(arch.lower(), variant if isinstance(variant, str) else "")
    return Platform(os_name.lower(), arch, variant)


def parse_descriptor(document: object, what: str) -> Descriptor:
    """Parse one descriptor object; InvalidImageError naming WHAT if malformed."""
    if not isinstance(document, Mapping):
        raise InvalidImageError(f"{what}: descriptor is not a JSON object", subject=what)
    digest = _field(document, "digest", str, what)
    parse_digest(digest, what=f"digest in {what}")
    size = _field(document, "size", int, what)
    if size < 0:
        raise InvalidImageError(f"{what}: negative size {size}", subject=what)
    media_type = document.get("mediaType", "")
    annotations = document.get("annotations") or {}
    if not isinstance(media_type, str) or not isinstance(annotations, Mapping):
        raise InvalidImageError(f"{what}: malformed 'mediaType' or 'annotations'", subject=what)
    if document.get("urls") and size == 0:
        raise InvalidImageError(f"{what}: a remote layer without a size", subject=what)
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        platform=_platform(document.get("platform"), what),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def document_type(document: Mapping[str, Any], descriptor_type: str) -> str:
    """Return the media type of a document: its own field, the descriptor's, or sniffed."""
    own = document.get("mediaType")
    if isinstance(own, str) and own:
        return own
    if descriptor_type:
        return descriptor_type
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document and "config" in document:
        return OCI_MANIFEST
    return ""


def parse_index(document: Mapping[str, Any], what: str) -> list[Descriptor]:
    """Return the manifest descriptors an index lists."""
    entries = _field(document, "manifests", list, what)
    return [parse_descriptor(entry, f"{what} manifests[{i}]") for i, entry in enumerate(entries)]


def parse_manifest(document: Mapping[str, Any], media_type: str, what: str) -> Manifest:
    """Return the config and layer descriptors of an image manifest."""
    config = parse_descriptor(document.get("config"), f"{what} config")
    layers_field = _field(document, "layers", list, what)
    layers = tuple(
        parse_descriptor(entry, f"{what} layers[{i}]") for i, entry in enumerate(layers_field)
    )
    for i, layer in enumerate(layers):
        check_layer_type(layer.media_type, f"{what} layers[{i}]")
    return Manifest(media_type=media_type, config=config, layers=layers)


def check_layer_type(media_type: str, what: str) -> None:
    """Raise unless MEDIA_TYPE is a layer type Lamina can unpack ("" is accepted)."""
    if not media_type or media_type in LAYER_TYPES:
        return
    if "encrypted" in media_type:
        raise UnimplementedError(
            f"{what}: encrypted layers ({media_type}) are not supported; decrypt the image "
            "first (for example with skopeo copy --decryption-key)",
            subject=media_type,
        )
    raise InvalidImageError(f"{what}: unknown layer media type {media_type!r}", subject=media_type)


def parse_config(document: Mapping[str, Any], what: str) -> ImageConfig:
    """Return the platform and diff ids of an image config."""
    rootfs = document.get("rootfs")
    if not isinstance(rootfs, Mapping):
        raise InvalidImageError(f"{what}: field 'rootfs' is missing", subject=what)
    if rootfs.get("type") != "layers":
        raise InvalidImageError(
            f"{what}: rootfs type {rootfs.get('type')!r} is not 'layers'", subject=what
        )
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise InvalidImageError(f"{what}: 'rootfs.diff_ids' is not a list of digests", subject=what)
    for diff_id in diff_ids:
        parse_digest(diff_id, what=f"diff id in {what}")
    os_name = document.get("os")
    arch = document.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        raise InvalidImageError(f"{what}: field 'os' or 'architecture' is missing", subject=what)
    variant = document.get("variant")
    arch, variant = _normalize_arch(arch.lower(), variant if isinstance(variant, str) else "")
    return ImageConfig(Platform(os_name.lower(), arch, variant), tuple(diff_ids))


def image_name(annotations: Mapping[str, str]) -> str:
    """Return the image name an index entry's annotations give, or ""."""
    return annotations.get(CONTAINERD_NAME_ANNOTATION) or annotations.get(REF_NAME_ANNOTATION, "")


def platforms_text(platforms: Sequence[Platform | None]) -> str:
    """Return a readable list of platforms for an error message."""
    names = sorted({str(p) if p else "unknown" for p in platforms})
    return ", ".join(names) if names else "none"
