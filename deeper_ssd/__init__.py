"""deeper-ssd: Caffe-faithful SSD and Deeper SSD (drone detection) in Python and PyTorch."""
__version__ = "0.1.0"
