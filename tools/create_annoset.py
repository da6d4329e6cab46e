#!/usr/bin/env python3
"""Drop-in for the SSD fork's scripts/create_annoset.py: same positionals (root, list file,
output db, optional example dir) and flags; a thin wrapper over ``deeper-ssd create-data``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["create-data"] + sys.argv[1:]))
