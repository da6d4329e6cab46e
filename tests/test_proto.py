"""The schema: generated module in sync, Caffe-SSD field numbers/defaults, our reserved range."""
import re
from pathlib import Path

import pytest

from deeper_ssd.proto import caffe_pb2, regenerate

OWN_RANGE = range(7700, 7800)
PROTO = Path(regenerate.__file__).with_name("caffe.proto")


def test_generated_module_matches_proto():
    fresh = regenerate.generate()
    assert regenerate.GENERATED.read_text() == fresh, \
        "caffe_pb2.py is stale: run python -m deeper_ssd.proto.regenerate"


def _field(message, name):
    return getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[name]


@pytest.mark.parametrize("message,field,number,default", [
    ("LayerParameter", "annotated_data_param", 200, None),
    ("LayerParameter", "multibox_loss_param", 201, None),
    ("LayerParameter", "permute_param", 202, None),
    ("LayerParameter", "prior_box_param", 203, None),
    ("LayerParameter", "detection_output_param", 204, None),
    ("LayerParameter", "detection_evaluate_param", 205, None),
    ("LayerParameter", "norm_param", 206, None),
    ("LayerParameter", "video_data_param", 207, None),
    ("LayerParameter", "convolution_param", 106, None),
    ("NetParameter", "layer", 100, None),
    ("SolverParameter", "show_per_class_result", 44, False),
    ("SolverParameter", "eval_type", 41, "classification"),
    ("SolverParameter", "ap_version", 42, "Integral"),
    ("SolverParameter", "test_initialization", 32, True),
    ("SolverParameter", "random_seed", 20, -1),
    ("SolverState", "minimum_loss", 5, pytest.approx(1e38, rel=1e-6)),
    ("DetectionOutputParameter", "code_type", 6, caffe_pb2.PriorBoxParameter.CORNER),
    ("DetectionOutputParameter", "variance_encoded_in_target", 8, False),
    ("DetectionOutputParameter", "keep_top_k", 7, -1),
    ("MultiBoxLossParameter", "code_type", 14, caffe_pb2.PriorBoxParameter.CORNER),
    ("MultiBoxLossParameter", "encode_variance_in_target", 16, False),
    ("MultiBoxLossParameter", "mining_type", 20, caffe_pb2.MultiBoxLossParameter.MAX_NEGATIVE),
    ("MultiBoxLossParameter", "sample_size", 22, 64),
    ("NonMaximumSuppressionParameter", "nms_threshold", 1, pytest.approx(0.3)),
    ("NormalizeParameter", "eps", 4, pytest.approx(1e-10)),
    ("NormalizeParameter", "across_spatial", 1, True),
    ("DataParameter", "backend", 8, caffe_pb2.DataParameter.LEVELDB),
    ("PriorBoxParameter", "offset", 13, pytest.approx(0.5)),
    ("PriorBoxParameter", "flip", 4, True),
    ("BatchSampler", "max_trials", 5, 100),
    ("ResizeParameter", "resize_mode", 2, caffe_pb2.ResizeParameter.WARP),
    ("FillerParameter", "sparse", 7, -1),
    ("NetState", "phase", 1, caffe_pb2.TEST),
])
def test_field_numbers_and_defaults(message, field, number, default):
    desc = _field(message, field)
    assert desc.number == number
    if default is not None:
        assert desc.default_value == default


def test_packed_encodings_follow_caffe():
    """Caffe writes BlobShape.dim and the BlobProto value arrays packed, other repeated scalars not."""
    packed = {("BlobShape", "dim"), ("BlobProto", "data"), ("BlobProto", "diff"),
              ("BlobProto", "double_data"), ("BlobProto", "double_diff")}
    text = PROTO.read_text()
    for message, field in packed:
        assert re.search(rf"repeated \w+ {field} = \d+ \[packed = true\]", text), (message, field)
    assert not _field("PriorBoxParameter", "min_size").is_packed
    assert not _field("TransformationParameter", "mean_value").is_packed


def test_enum_values_match_caffe():
    assert caffe_pb2.PriorBoxParameter.CodeType.Value("CORNER") == 1
    assert caffe_pb2.PriorBoxParameter.CodeType.Value("CENTER_SIZE") == 2
    assert caffe_pb2.EltwiseParameter.EltwiseOp.Value("SUM") == 1
    assert caffe_pb2.LossParameter.NormalizationMode.Value("VALID") == 1
    assert caffe_pb2.ResizeParameter.Interp_mode.Value("LANCZOS4") == 5


def test_own_layer_params_stay_in_reserved_range():
    """Every LayerParameter field that is not Caffe's lives in 7700-7799, and nothing else does."""
    caffe_max = 207
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        assert field.number <= caffe_max or field.number in OWN_RANGE, field.name
        if field.number in OWN_RANGE:
            assert field.message_type is not None and field.name.endswith("_param"), field.name
