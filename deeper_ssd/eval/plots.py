"""Figures: precision-recall curves in the style of the paper's Fig. 8, and training curves.

* :func:`plot_pr_curves` — one line per model (``deeper-ssd test --compare``), recall on x,
  precision on y, both 0..1, legend with each model's AP; one panel per class.
* :func:`parse_training_log` / :func:`plot_training_log` — loss, learning rate and test
  outputs (mAP) against the iteration, read from a Caffe-style training log (ours or real
  Caffe's glog output: lines ``Iteration N, loss = L``, ``Iteration N, lr = R``,
  ``Iteration N, Testing net (#i)`` followed by ``Test net output #k: name = v``).

PNG files through matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

__all__ = ["Curve", "plot_pr_curves", "TrainingLog", "parse_training_log", "plot_training_log"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Curve:
    """One model's PR curves: ``name`` (legend), ``per_class[label] = (class name, recall,
    precision, ap)``."""
    name: str
    per_class: Dict[int, Tuple[str, List[float], List[float], float]]

    @classmethod
    def from_report(cls, report: dict, name: str = None) -> "Curve":
        """From the JSON of ``deeper-ssd test``."""
        per_class = {}
        for key, curve in report.get("pr_curves", {}).items():
            ap = report.get("per_class", {}).get(key, {}).get("ap", float("nan"))
            per_class[int(key)] = (curve.get("name", f"class{key}"), curve["recall"], curve["precision"], ap)
        return cls(name or report.get("name", "model"), per_class)


def plot_pr_curves(curves: Sequence[Curve], path, title: str = "Precision-recall") -> Path:
    """Write the PR figure to ``path`` (PNG); returns the path."""
    plt = _pyplot()
    labels = sorted({label for c in curves for label in c.per_class})
    if not labels:
        raise ValueError("no PR curve to plot (no detections?)")
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 5), squeeze=False)
    for ax, label in zip(axes[0], labels):
        class_name = next(c.per_class[label][0] for c in curves if label in c.per_class)
        for curve in curves:
            if label not in curve.per_class:
                continue
            _, recall, precision, ap = curve.per_class[label]
            ax.plot([0.0] + list(recall), [precision[0] if precision else 1.0] + list(precision),
                    linewidth=1.6, label=f"{curve.name} (AP {ap:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("Recall")
        ax.set_ylabel("Precision")
        ax.set_title(f"{title}: {class_name}" if len(labels) > 1 or class_name else title)
        ax.grid(True, linestyle=":", linewidth=0.6)
        ax.legend(loc="lower left", fontsize=9)
    return _save(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------
# training logs

_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = ([-+\w.]+)")
_LR = re.compile(r"Iteration (\d+), lr = ([-+\w.]+)")
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_TEST_OUT = re.compile(r"Test net output #(\d+): (\S+) = ([-+\w.]+)")


@dataclass
class TrainingLog:
    """Series read from a log: ``loss`` and ``lr`` as ``[(iteration, value)]``; ``tests`` as
    ``{"<net>:<output name>": [(iteration, value)]}``."""
    loss: List[Tuple[int, float]] = field(default_factory=list)
    lr: List[Tuple[int, float]] = field(default_factory=list)
    tests: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)


def parse_training_log(path) -> TrainingLog:
    """Read a Caffe-style training log (extra text and glog prefixes are ignored)."""
    log = TrainingLog()
    test_iter, test_net = None, 0
    with open(path, errors="replace") as handle:
        for line in handle:
            m = _LOSS.search(line)
            if m:
                log.loss.append((int(m.group(1)), float(m.group(2))))
                continue
            m = _LR.search(line)
            if m:
                log.lr.append((int(m.group(1)), float(m.group(2))))
                continue
            m = _TESTING.search(line)
            if m:
                test_iter, test_net = int(m.group(1)), int(m.group(2))
                continue
            m = _TEST_OUT.search(line)
            if m and test_iter is not None:
                log.tests.setdefault(f"{test_net}:{m.group(2)}", []).append((test_iter, float(m.group(3))))
    return log


def plot_training_log(log: TrainingLog, path, title: str = "Training") -> Path:
    """Loss, learning rate and test outputs against the iteration, stacked (PNG)."""
    plt = _pyplot()
    panels = [("loss (smoothed)", {"loss": log.loss}), ("learning rate", {"lr": log.lr})]
    if log.tests:
        panels.append(("test output", log.tests))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        ax.set_ylabel(ylabel)
        ax.grid(True, linestyle=":", linewidth=0.6)
        if ylabel == "learning rate" and any(v > 0 for _, v in log.lr):
            ax.set_yscale("log")
        if len(series) > 1 or ylabel == "test output":
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].set_title(title)
    return _save(fig, path, dpi=110)


def _save(fig, path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (folders created) and close it; returns the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
