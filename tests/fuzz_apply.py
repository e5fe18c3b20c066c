"""Coverage-guided fuzzing of the layer applier with atheris (libFuzzer), for long runs.

    python tests/fuzz_apply.py [--corpus DIR] [-- LIBFUZZER-OPTIONS...]

Each input is one mode byte followed by a tar stream. Bit 0 of the mode
byte selects the applier (the generic one or the overlay upper-directory
one). Bits 1 and 2 select a compression (none, gzip, zstd) applied to the
stream first, so that the decompression thread is fuzzed too. The check
of every input is `fuzz_layers.check_apply`: only Lamina's own errors,
nothing written outside the target, no file descriptor or thread left
behind.

The corpus folder (default: a new temporary one) is seeded, when empty,
with hazard layers in the PAX, GNU and ustar formats and with layers GNU
tar writes (sparse files in three formats, hard links, xattrs, long
names). After libFuzzer mutates an input, the mutator rewrites the
checksums of the tar headers it recognises, most of the time, so that the
mutations reach the entry handling instead of dying at the checksum test.

A hang is reported by libFuzzer's -timeout (20 s unless given), a crash
input is written as crash-* in the current folder. Examples:

    python tests/fuzz_apply.py -- -max_total_time=3600 -jobs=2 -workers=2
    python tests/fuzz_apply.py --corpus fuzz-corpus -- -runs=100000
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
import tarfile
import tempfile
from pathlib import Path

import atheris
import zstandard

with atheris.instrument_imports(include=["lamina"]):
    from fuzz_layers import check_apply, gnu_tar_layers, hazard_layer

BLOCK = 512
CHECKSUM = slice(148, 156)
MAGIC = slice(257, 262)
# How often the mutator repairs header checksums; the rest keeps them broken.
REPAIR_SHARE = 0.9


def decode(data: bytes) -> tuple[bool, bytes]:
    """Return (use the overlay applier, layer bytes) for the input DATA."""
    if not data:
        return False, b""
    mode, tar = data[0], data[1:]
    compression = (mode >> 1) & 3
    if compression == 1:
        tar = gzip.compress(tar, compresslevel=1, mtime=0)
    elif compression == 2:
        tar = zstandard.ZstdCompressor(level=1).compress(tar)
    return bool(mode & 1), tar


def fix_checksums(data: bytearray, start: int) -> None:
    """Rewrite the checksum of every block of DATA[START:] that has the ustar magic."""
    for offset in range(start, len(data) - BLOCK + 1, BLOCK):
        header = data[offset : offset + BLOCK]
        if header[MAGIC] != b"ustar":
            continue
        header[CHECKSUM] = b" " * 8
        data[offset + CHECKSUM.start : offset + CHECKSUM.stop] = b"%06o\0 " % sum(header)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    mutated = bytearray(atheris.Mutate(data, max_size))
    if random.Random(seed).random() < REPAIR_SHARE:
        fix_checksums(mutated, 1)
    return bytes(mutated)


def test_one_input(data: bytes) -> None:
    overlay, layer = decode(data)
    check_apply(layer, overlay, time_limit=None)


def seed_corpus(corpus: Path) -> None:
    layers = [hazard_layer(tarfile.PAX_FORMAT), hazard_layer(tarfile.GNU_FORMAT)]
    layers.append(hazard_layer(tarfile.USTAR_FORMAT))
    with tempfile.TemporaryDirectory(prefix="lamina-fuzz-seeds-") as work:
        layers += gnu_tar_layers(Path(work))
    for index, layer in enumerate(layers):
        for mode in range(6):
            (corpus / f"seed-{index}-{mode}").write_bytes(bytes([mode]) + layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="corpus folder (default: a temporary one)")
    parser.add_argument("libfuzzer", nargs="*", help="options for libFuzzer, after --")
    args = parser.parse_args()
    if args.corpus is None:
        args.corpus = Path(tempfile.mkdtemp(prefix="lamina-fuzz-corpus-"))
        print(f"corpus: {args.corpus}", file=sys.stderr)
    args.corpus.mkdir(parents=True, exist_ok=True)
    if not any(args.corpus.iterdir()):
        seed_corpus(args.corpus)
    options = list(args.libfuzzer)
    if not any(option.startswith("-timeout=") for option in options):
        options.append("-timeout=20")
    atheris.Setup([sys.argv[0], *options, str(args.corpus)], test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
