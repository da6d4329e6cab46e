"""Shared fixtures: the reference material beside the checkout, and the Caffe oracle.

``../shared/reference`` (found through DEEPER_SSD_SHARED or next to the repository) exists on the
project's machines and in CI but not in a user's clone; tests that read it skip with a stated
reason when it is absent. The Caffe oracle (a real SSD-Caffe in a chroot, see tests/oracle.py)
is optional everywhere.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def shared_dir():
    """The project's shared folder (papers, reference prototxts), or None when absent."""
    candidate = Path(os.environ.get("DEEPER_SSD_SHARED", REPO.parent / "shared"))
    return candidate if (candidate / "reference").is_dir() else None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared/reference is absent (it sits beside the checkout on the project's "
                    "machines, not in a user's clone); set DEEPER_SSD_SHARED to its parent folder")
    return shared / "reference"


@pytest.fixture(scope="session")
def oracle():
    import oracle as oracle_module
    reason = oracle_module.unavailable_reason()
    if reason:
        pytest.skip(f"Caffe oracle not available: {reason}")
    return oracle_module
