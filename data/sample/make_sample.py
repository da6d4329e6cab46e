#!/usr/bin/env python3
"""Generate the synthetic drone sample set (see deeper_ssd/data/sample.py); same options as
``deeper-ssd make-sample``. Output defaults to data/sample/generated/ (not committed)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-sample"] + sys.argv[1:]))
