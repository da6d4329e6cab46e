"""The training console: Caffe's log lines on stdout (and in a log file with a glog-style
prefix) and a progress line on stderr."""
from __future__ import annotations

import datetime
import os
import sys

__all__ = ["Console"]


class Console:
    """``log(message)``: the line on stdout and, prefixed ``I<mmdd hh:mm:ss.us> <pid> deeper-ssd]``,
    appended to ``log_path`` (when given). ``progress(p)`` takes a
    :class:`deeper_ssd.solver.trainer.Progress`: the progress line is redrawn in place on a
    terminal, printed every ``every`` updates otherwise; ``progress=False`` turns it off.
    ``hold``: keep the file's lines in memory until :meth:`release` (a run that fails while it
    is set up writes no log file)."""

    def __init__(self, log_path=None, progress: bool = True, every: int = 10, hold: bool = False):
        self.path = log_path                  # opened (folder made) at the first line written
        self.file = None
        self._held = [] if hold else None
        self.tty = sys.stderr.isatty()
        self.progress_on = progress
        self.every = max(1, every)
        self._bar = False
        self._pid = os.getpid()

    def log(self, message: str) -> None:
        self._clear()
        print(message, flush=True)
        if not self.path:
            return
        now = datetime.datetime.now()
        line = f"I{now:%m%d %H:%M:%S.%f} {self._pid} deeper-ssd] {message}\n"
        if self._held is not None:
            self._held.append(line)
        else:
            self._write([line])

    def release(self) -> None:
        """Write the held lines to the log file; later lines go straight to it."""
        held, self._held = self._held or [], None
        self._write(held)

    def _write(self, lines) -> None:
        if not lines:
            return
        if self.file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, "a", buffering=1)
        self.file.writelines(lines)

    def progress(self, p) -> None:
        if not self.progress_on:
            return
        width = 24
        done = int(width * p.iter / max(p.max_iter, 1))
        eta = (p.max_iter - p.iter) * p.seconds
        text = (f"[{'#' * done}{'.' * (width - done)}] {p.iter}/{p.max_iter} loss {p.loss:.4g} "
                f"lr {p.lr:.3g} {p.images_per_s:.1f} img/s data {p.data_s:.3f}s "
                f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        if self.tty:
            sys.stderr.write("\r" + text + "\x1b[K")
            sys.stderr.flush()
            self._bar = True
        elif p.iter % self.every == 0 or p.iter == p.max_iter:
            print(text, file=sys.stderr, flush=True)

    def _clear(self) -> None:
        if self._bar:
            sys.stderr.write("\r\x1b[K")
            self._bar = False

    def close(self) -> None:
        self._clear()
        if self.file is not None:
            self.file.close()
