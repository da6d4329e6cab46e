"""Data: annotated LMDB read/write as the SSD fork's convert_annoset (annoset), SSD augmentation
(transforms), worker-process batch loading (loader) and the bundled synthetic drone set (sample)."""
from .annoset import AnnosetError, AnnotatedDB, ConvertOptions, build_annoset, describe_db
from .transforms import SSDTransformer, TransformError

__all__ = ["AnnosetError", "AnnotatedDB", "ConvertOptions", "build_annoset", "describe_db",
           "SSDTransformer", "TransformError"]
