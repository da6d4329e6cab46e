#!/usr/bin/env python3
"""Write prototxt/<model>/{train,test,deploy,solver}.prototxt for zoo models; a thin wrapper over ``deeper-ssd generate`` (MODEL... | --all, --out DIR, --set NAME=VALUE)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate"] + sys.argv[1:]))
