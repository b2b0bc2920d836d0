"""Collects the tests of several pytest command lines in one process, for tests/test_docs_bash.py: the first line pays
for importing the suites, the others reuse them. Run from the checkout's root as

    python collect_worker.py '[["bench/", "--benchmark-only"], ["bench/bench_rlhf.py", "-k", "zero3"]]'

it prints one line, `COLLECTED [30, 4]`: how many tests each line collects (null: pytest failed or found none)."""

from __future__ import annotations

import json
import sys

import pytest


class _Count:
    """A plugin that keeps how many tests the session collected."""

    items: int | None = None

    def pytest_collection_finish(self, session):
        self.items = len(session.items)


def main(lines: list[list[str]]) -> None:
    counts = []
    for args in lines:
        count = _Count()
        status = pytest.main([*args, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[count])
        counts.append(count.items if status == pytest.ExitCode.OK else None)
    print("COLLECTED " + json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
