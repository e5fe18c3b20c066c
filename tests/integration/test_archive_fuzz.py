"""Mutated tar streams against the layer applier: typed errors only, nothing outside, no hang.

Each example starts from a seed layer that already carries the classic
hazards (see `fuzz_layers.hazard_layer`), overwrites bytes and cuts the
stream, then applies it with both appliers. The applier may accept or reject
the result, but it must raise nothing except Lamina's own errors, leave the
sibling folder exactly as it was, close what it opened and finish in time.

LAMINA_FUZZ_EXAMPLES raises the number of examples for a long run;
`tests/fuzz_apply.py` is the coverage-guided fuzzer (atheris) for longer
ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_layers import check_apply, hazard_layer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "120"))
SEED = hazard_layer()
FUZZER = Path(__file__).parents[1] / "fuzz_apply.py"


def _mutate(seed: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for position, value in changes:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % len(data) :]
    return bytes(data)


mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=len(SEED) - 1), st.integers(0, 255)),
    max_size=12,
)
cuts = st.none() | st.integers(min_value=0, max_value=len(SEED) - 1)
fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_seed_layer_applies_safely() -> None:
    check_apply(SEED, overlay=False)
    check_apply(SEED, overlay=True)


@fuzz_settings
@given(changes=mutations, cut=cuts)
def test_mutated_layer_generic_path(changes: list[tuple[int, int]], cut: int | None) -> None:
    check_apply(_mutate(SEED, changes, cut), overlay=False)


@fuzz_settings
@given(changes=mutations, cut=cuts)
def test_mutated_layer_overlay_path(changes: list[tuple[int, int]], cut: int | None) -> None:
    check_apply(_mutate(SEED, changes, cut), overlay=True)


@pytest.mark.slow
def test_atheris_target_runs(tmp_path: Path) -> None:
    """The long-run fuzzer starts from its seeds and runs a few hundred inputs cleanly."""
    corpus = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, str(FUZZER), "--corpus", str(corpus), "--", "-runs=300", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # where libFuzzer writes a crashing input
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # libFuzzer may run a few inputs past -runs before it stops.
    done = re.search(r"^Done (\d+) runs", result.stderr, re.MULTILINE)
    assert done is not None, result.stderr[-3000:]
    assert int(done.group(1)) >= 300
    assert len(list(corpus.iterdir())) >= 5
