#!/usr/bin/env python3
"""Draw a net (prototxt or zoo model name) as layers, blobs and shapes, like Caffe's draw_net: NET OUT.png|svg|pdf|dot; a thin wrapper over ``deeper-ssd draw``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["draw"] + sys.argv[1:]))
