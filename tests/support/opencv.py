"""Assert that our executor agrees with OpenCV's Caffe importer layer by layer.

The comparison itself is deeper_ssd.opencv_check.compare (also behind ``deeper-ssd
opencv-check``); this helper turns it into assertions for the tests.
"""
from deeper_ssd.opencv_check import compare


def compare_with_opencv(deploy_path, seed=0, batch=1, rtol=1e-4):
    """Assert per-layer agreement on seeded random weights; returns the number of layers compared."""
    result = compare(deploy_path, seed=seed, batch=batch)
    failures = result.failures(rtol)
    assert not failures, "; ".join(f"{d.layer} ({d.type}): max diff {d.max_abs_diff:.3g} vs scale "
                                   f"{d.max_abs:.3g} {d.note}" for d in failures)
    return len(result.layers)
