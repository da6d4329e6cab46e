#!/usr/bin/env python3
"""Loss, learning rate and test mAP of a training log as a PNG (like Caffe's
tools/extra/plot_training_log.py); a thin wrapper over ``deeper-ssd plot-training-log``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot-training-log"] + sys.argv[1:]))
