"""Caffe's command-line spellings for ``tools/train.py`` and ``tools/test.py``.

``caffe train`` and ``caffe test`` take gflags: one or two dashes, ``-flag value`` or
``-flag=value``, underscores in names (``-solver S -weights W -snapshot X -gpu 0,1
-iterations N -model M -sigint_effect stop``). :func:`translate` rewrites them into this
project's ``--flag value`` spellings; ``-gpu`` becomes ``--device cuda:N`` for one GPU and
``--gpus`` for several (``-gpu all``: every visible GPU; ``test`` runs on the first, as Caffe
does). Arguments that are not flags pass unchanged.
"""
from __future__ import annotations

import re
from typing import List, Sequence

__all__ = ["translate"]

_FLAG = re.compile(r"^--?([A-Za-z][A-Za-z0-9_-]+)(=(.*))?$", re.DOTALL)


def translate(argv: Sequence[str], command: str) -> List[str]:
    """``argv`` of ``caffe COMMAND`` (train or test) -> arguments of ``deeper-ssd COMMAND``."""
    out: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        match = _FLAG.match(args[i])
        if match is None:                 # a value, a one-letter flag (-h) or a negative number
            out.append(args[i])
            i += 1
            continue
        name = match.group(1).replace("_", "-")
        if name != "gpu":
            out.append(f"--{name}" + (f"={match.group(3)}" if match.group(2) else ""))
            i += 1
            continue
        if match.group(2):
            value, i = match.group(3), i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            out.append("--gpus")          # argparse reports the missing value
            i += 1
            continue
        out.extend(_gpu_flags(value, command))
    return out


def _gpu_flags(value: str, command: str) -> List[str]:
    """Caffe's ``-gpu 0``, ``-gpu 0,1`` or ``-gpu all`` as this project's device flags."""
    if value.strip().lower() == "all":
        import torch
        count = torch.cuda.device_count()
        if count == 0:
            return ["--device", "cuda"]   # refused with a clear line where CUDA is absent
        ids = [str(i) for i in range(count)]
    else:
        ids = [g.strip() for g in value.split(",") if g.strip()]
    if len(ids) == 1 or command != "train":
        return ["--device", f"cuda:{ids[0]}"] if ids else ["--gpus", value]
    return ["--gpus", ",".join(ids)]
