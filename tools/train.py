#!/usr/bin/env python3
"""Caffe's ``caffe train``: --solver S [--weights A.caffemodel[,B]] [--snapshot X.solverstate]
[--device cpu|cuda] [--gpus 0,1,...]; Caffe's own spellings work too (``-solver S -weights W
-snapshot X -gpu 0,1|all -sigint_effect stop``, ``-flag=value``; deeper_ssd/caffe_flags.py).
A thin wrapper over ``deeper-ssd train``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.caffe_flags import translate  # noqa: E402
from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train"] + translate(sys.argv[1:], "train")))
