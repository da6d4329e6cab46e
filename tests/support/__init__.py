"""Helpers shared by the test modules; test modules import from here, never from each other.

* :mod:`support.layers`: run one layer here and (optionally) in the Caffe oracle;
* :mod:`support.multibox`: a literal per-image MultiBoxLoss and the hand-worked box fixtures;
* :mod:`support.opencv`: layer-by-layer agreement with OpenCV's Caffe importer as assertions;
* :mod:`support.tiny_ssd`: a 64x64 SSD with its LMDBs for trainer and tool tests;
* :mod:`support.oracle`: run a script inside the optional Caffe oracle.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def zip_same(ours, theirs, what=""):
    """``zip`` of two sequences that must have the same length (a missing blob is a failure)."""
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs), f"{what}: {len(ours)} here vs {len(theirs)} there"
    return zip(ours, theirs)
