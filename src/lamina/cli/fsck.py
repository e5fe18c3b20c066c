"""`lamina fsck [--repair]`: check a root against its metadata store.

Exit status: 0 when nothing is found, EXIT_REPAIRED when `--repair` repaired
every finding, EXIT_FINDINGS when findings remain (always without
`--repair`). Both differ from the exit statuses of the error classes in
lamina.errors, so a script can tell "the root has problems" from "fsck
itself failed".
"""

from __future__ import annotations

import argparse

from lamina.cli.common import open_from_args, plural, print_json
from lamina.fsck import FsckResult, fsck

EXIT_FINDINGS = 10
EXIT_REPAIRED = 11


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add the `fsck` command to COMMANDS."""
    parser = commands.add_parser(
        "fsck",
        help="check the root against its metadata store, and repair it",
        description=(
            "Cross-check the metadata store with the snapshot directories, image records "
            "and the mount table, print each problem and what --repair does about it. "
            "--repair removes directories no snapshot owns, unmounts leftover mounts, "
            "measures wrong usage again and drops records whose uncommitted content is "
            "gone; it never removes committed content."
        ),
        epilog=(
            f"Exit status: 0 when the root is clean, {EXIT_FINDINGS} when problems remain, "
            f"{EXIT_REPAIRED} when --repair repaired every problem found."
        ),
        parents=[common],
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="repair what can be repaired without losing committed data",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run `lamina fsck` with parsed ARGS; return the exit status."""
    sn = open_from_args(args)
    try:
        result = fsck(sn, repair=args.repair)
    finally:
        sn.close()
    if args.json:
        print_json(result.to_json())
    else:
        print_result(result)
    return exit_status(result)


def exit_status(result: FsckResult) -> int:
    if result.clean:
        return 0
    if result.unresolved:
        return EXIT_FINDINGS
    return EXIT_REPAIRED


def print_result(result: FsckResult) -> None:
    if result.clean:
        print("clean: no problems found")
        return
    if not result.outcomes:
        for finding in result.findings:
            print(f"{finding.kind}: {finding.subject}: {finding.detail}")
            print(f"  repair: {finding.action}")
        repairable = sum(1 for finding in result.findings if finding.repairable)
        found = plural(len(result.findings), "problem")
        if repairable == 0:
            print(f"{found} found; none can be repaired automatically, see above")
        else:
            print(f"{found} found; 'lamina fsck --repair' repairs {repairable} of them")
        return
    for outcome in result.outcomes:
        finding = outcome.finding
        print(f"{finding.kind}: {finding.subject}: {finding.detail}")
        if outcome.repaired:
            print(f"  repaired: {finding.action}")
        else:
            print(f"  not repaired: {outcome.error}; {finding.action}")
    left = len(result.unresolved)
    found = plural(len(result.findings), "problem")
    print(f"{found} found, {len(result.findings) - left} repaired")
