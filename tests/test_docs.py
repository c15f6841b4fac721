"""The docs' references to tests point at tests that exist (docs/reliability.md names the
test behind each behaviour; a renamed or removed test must not leave a row claiming it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _references(text: str) -> list[tuple[str, str]]:
    """(file, test) for each ``file::test[...]`` and each ``::test`` that follows one (the
    same file) in a table cell; ``…[id]`` is test_bad_inputs.py's case ``id``."""
    found = []
    rows = [line for line in text.splitlines() if line.startswith("|")]
    for cell in "|".join(rows).split("|"):
        current = None
        for m in re.finditer(r"`(test_[a-z0-9_]+\.py)?::(test_[A-Za-z0-9_]+)", cell):
            current = m.group(1) or current
            if current:
                found.append((current, m.group(2)))
        found += [("…", case) for case in re.findall(r"`…\[([^\]]+)\]`", cell)]
    return found


def test_reliability_doc_names_only_tests_that_exist():
    text = (ROOT / "docs" / "reliability.md").read_text()
    refs = _references(text)
    assert len(refs) > 40  # the table is read, not skipped
    bad_inputs = (TESTS / "test_bad_inputs.py").read_text()
    cases = set(re.findall(r'case\("([^"]+)"', bad_inputs))
    missing = []
    for file, name in refs:
        if file == "…":
            missing += [] if name in cases else [f"test_bad_inputs.py case {name}"]
        elif not (TESTS / file).is_file() or f"def {name}(" not in (TESTS / file).read_text():
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
