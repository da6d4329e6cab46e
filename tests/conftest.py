"""Shared fixtures: the reference material beside the checkout, and the Caffe oracle.

The reference prototxts live in ``../shared/reference``, the project's shared folder beside the
checkout (found through DEEPER_SSD_SHARED or next to the repository): it exists on the
project's machines and in CI but not in a user's clone, so tests that read it skip with a
stated reason when it is absent. The Caffe oracle (a real SSD-Caffe in a chroot, see
tests/support/oracle.py) is optional everywhere.

Tests that use the ``oracle`` fixture get the ``oracle`` marker, tests that use
``reference_dir`` the ``reference`` marker (``pytest -m oracle`` runs only the former); the
terminal summary ends with one line counting how many of each ran, passed and skipped.
"""
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import REPO  # noqa: E402  (the path above makes the support package importable)

MARKED_FIXTURES = {"oracle": "oracle", "reference_dir": "reference"}


def shared_dir():
    """The project's shared folder beside the checkout (papers, reference prototxts), or None."""
    candidate = Path(os.environ.get("DEEPER_SSD_SHARED", REPO.parent / "shared"))
    return candidate if (candidate / "reference").is_dir() else None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared/reference is absent (the project's shared folder beside the checkout "
                    "exists on the project's machines, not in a user's clone); set DEEPER_SSD_SHARED "
                    "to its parent folder")
    return shared / "reference"


@pytest.fixture(scope="session", autouse=True)
def fast_path_cache(tmp_path_factory):
    """detect/test/diffmap cache compiled graphs (deeper_ssd.fast): in a temporary folder, not in
    the user's ~/.cache."""
    previous = os.environ.get("DEEPER_SSD_CACHE")
    os.environ["DEEPER_SSD_CACHE"] = str(tmp_path_factory.mktemp("fast-cache"))
    yield
    if previous is None:
        os.environ.pop("DEEPER_SSD_CACHE", None)
    else:
        os.environ["DEEPER_SSD_CACHE"] = previous


@pytest.fixture(scope="session")
def oracle():
    from support import oracle as oracle_module
    reason = oracle_module.unavailable_reason()
    if reason:
        pytest.skip(f"Caffe oracle not available: {reason}")
    return oracle_module


def pytest_collection_modifyitems(config, items):
    """Mark every test by the optional resources its fixtures need."""
    for item in items:
        for fixture, marker in MARKED_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


def pytest_terminal_summary(terminalreporter):
    """One line: how many oracle and reference tests ran, passed, failed and skipped."""
    final = {}                            # nodeid -> (outcome, keywords); a failure wins
    for outcome in ("passed", "skipped", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if outcome == "passed" and report.when != "call":
                continue                      # the setup/teardown of a test that ran
            final[report.nodeid] = (outcome, getattr(report, "keywords", {}))
    counts = {marker: Counter() for marker in MARKED_FIXTURES.values()}
    for outcome, keywords in final.values():
        for marker, counter in counts.items():
            if marker in keywords:
                counter["failed" if outcome == "error" else outcome] += 1
    parts = []
    for marker, c in counts.items():
        ran = c["passed"] + c["failed"]
        failed = f", {c['failed']} failed" if c["failed"] else ""
        parts.append(f"{marker} tests: {ran} ran ({c['passed']} passed{failed}), {c['skipped']} skipped")
    terminalreporter.write_line("; ".join(parts))
