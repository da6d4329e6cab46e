"""Run code inside the Caffe oracle: a real SSD-Caffe with pycaffe in a Debian chroot, built by
``../shared/tools/caffe-oracle-setup``, a script in the project's shared folder beside the
checkout (it is not part of a user's clone; without the oracle its tests skip).

    outputs = oracle.run('''
        net = caffe.Net("deploy.prototxt", "w.caffemodel", caffe.TEST)
        net.blobs["data"].data[...] = np.load("x.npy")
        out["y"] = net.forward()["detection_out"]
    ''', {"deploy.prototxt": text, "w.caffemodel": path, "x.npy": array})

Files go in as str/bytes/paths/numpy arrays; the script runs with ``caffe``, ``np`` and a dict
``out`` in scope, inside the exchange folder; every array put into ``out`` comes back. The
chroot's Python is 3.9 with numpy 1.19, so only .npy files cross the boundary.
"""
import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("CAFFE_ORACLE_ROOT", "/var/tmp/caffe-oracle"))

_PRELUDE = """\
import os, sys
sys.path.insert(0, {pydir!r})
os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np
import caffe
caffe.set_mode_cpu()
out = {{}}
"""
_EPILOGUE = """
os.makedirs("out", exist_ok=True)
for _name, _value in out.items():
    np.save(os.path.join("out", _name + ".npy"), np.asarray(_value))
"""


def unavailable_reason():
    """None when the oracle can be used, else why not."""
    if not (ROOT / "ORACLE_PY").is_file():
        return f"{ROOT}/ORACLE_PY missing (run ../shared/tools/caffe-oracle-setup)"
    if os.geteuid() != 0:
        return "chroot needs root"
    return None


def run(script: str, files=None, timeout: int = 600) -> dict:
    """Execute ``script`` in the oracle with ``files`` beside it; return the arrays of ``out``."""
    pydir = (ROOT / "ORACLE_PY").read_text().strip()
    (ROOT / "tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="deeper-ssd-", dir=ROOT / "tmp"))
    try:
        for name, value in (files or {}).items():
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, np.ndarray):
                np.save(target, value)
            elif isinstance(value, bytes):
                target.write_bytes(value)
            elif isinstance(value, Path):
                shutil.copyfile(value, target)
            else:
                target.write_text(value)
        body = _PRELUDE.format(pydir=pydir) + textwrap.dedent(script) + _EPILOGUE
        (work / "script.py").write_text(body)
        inside = "/" + str(work.relative_to(ROOT))
        proc = subprocess.run(["chroot", str(ROOT), "/bin/sh", "-c", f"cd {inside} && python3 script.py"],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"oracle script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return {p.stem: np.load(p) for p in sorted((work / "out").glob("*.npy"))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
