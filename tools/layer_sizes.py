#!/usr/bin/env python3
"""The Deeper SSD paper's Tables 1, 4 and 6 beside the built nets (--paper table1|table4|table6), or a zoo model's layer sizes (--model NAME); a thin wrapper over ``deeper-ssd layer-sizes``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["layer-sizes"] + sys.argv[1:]))
