"""A seeded, bounded fuzz of the reading APIs (qformat.testing.fuzz): verify, inspect, the card renderer and
from_pretrained answer every mutated checkpoint or refuse it with a QFormatError (transformers may refuse, in its own
words, a config.json it parses before qformat is called, if verify refuses it too); nothing hangs, dies, or hands back
a model with non-finite logits. A failure lists each distinct problem with one case to replay:
`python -m qformat.testing.fuzz --seed 9 --case N`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qformat.testing.fuzz import BASES, case_rng, make_bases, mutate_case, run_apis, run_fuzz

SEED = 9
CASES = 500
TIMEOUT_S = 10.0  # per API call; normal calls take well under 0.2 s


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_unmutated_bases_pass_every_api(bases):
    """The fuzzer's baseline: each base checkpoint verifies, inspects, renders and loads with finite logits."""
    for base in BASES:
        outcomes = run_apis(bases[base.name], base, bases)
        assert outcomes == {api: ("ok", "") for api in outcomes}, base.name


def test_cases_replay_identically(bases, tmp_path):
    """A case is a function of (seed, index): the same mutations and the same bytes every time."""
    for index in range(20):
        results = []
        for copy in ("a", "b"):
            rng = case_rng(SEED, index)
            base = rng.choice(BASES)
            folder = tmp_path / f"{index}-{copy}"
            shutil.copytree(bases[base.name], folder)
            described = mutate_case(folder, rng)
            files = {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
                     for p in sorted(folder.rglob("*"))}
            results.append((described, files))
        assert results[0] == results[1]
        assert results[0][0], f"case {index} applied no mutation"


def test_fuzz_every_failure_is_a_qformat_error(bases, tmp_path):
    """500 mutated checkpoints: no other exception, no hang past the per-call deadline, no non-finite model."""
    report = run_fuzz(CASES, SEED, jobs=2, timeout=TIMEOUT_S, workdir=tmp_path, bases=bases)
    assert len(report.cases) == CASES
    fuzzer_bugs = [case.describe() for case in report.cases if "mutate" in case.outcomes]
    assert not fuzzer_bugs, fuzzer_bugs[:3]
    assert sum(len(case.outcomes) for case in report.cases) == CASES * 4
    if report.bad:
        pytest.fail(f"{len(report.bad)} of {CASES} cases went wrong:\n{report.bad_classes()}", pytrace=False)
