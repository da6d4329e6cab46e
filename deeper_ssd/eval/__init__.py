"""Evaluation: Caffe's average precision and the test-time accumulation of DetectionEvaluate rows."""
from .ap import AP_VERSIONS, DetectionAccumulator, DetectionResult, compute_ap

__all__ = ["AP_VERSIONS", "DetectionAccumulator", "DetectionResult", "compute_ap"]
