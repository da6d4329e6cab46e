#!/usr/bin/env python3
"""Evaluate a test net: mAP, per-class and per-size AP, PR curve, detection speed, results.json;
Caffe's ``caffe test`` spellings work too (``-model M -weights W -iterations N -gpu 0``,
``-flag=value``; deeper_ssd/caffe_flags.py). A thin wrapper over ``deeper-ssd test``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.caffe_flags import translate  # noqa: E402
from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["test"] + translate(sys.argv[1:], "test")))
