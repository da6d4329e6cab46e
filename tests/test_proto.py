"""The schema: generated module in sync, Caffe-SSD field numbers/defaults, our reserved range."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

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


# ---- field for field against the SSD fork's compiled schema (tests/support/fork_schema.py) ----

# Fields that the fork lacks and that are allowed anyway: OpenCV's Caffe extensions used by
# published SSD nets (docs/schema.md says where each comes from).
OPENCV_EXTRAS = {("PriorBoxParameter", n) for n in ("offset_h", "offset_w", "width", "height")}


def _by_name(file_proto):
    """{qualified name: DescriptorProto} and {qualified name: EnumDescriptorProto}, nested included."""
    messages, enums = {}, {e.name: e for e in file_proto.enum_type}

    def walk(prefix, message):
        messages[prefix + message.name] = message
        for enum in message.enum_type:
            enums[f"{prefix}{message.name}.{enum.name}"] = enum
        for nested in message.nested_type:
            walk(f"{prefix}{message.name}.", nested)
    for message in file_proto.message_type:
        walk("", message)
    return messages, enums


def _default(field):
    """A field's default, floats compared at float32 precision (protoc versions print them differently)."""
    if not field.HasField("default_value"):
        return None
    if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
        return float(np.float32(float(field.default_value)))
    return field.default_value


def test_schema_matches_the_ssd_fork_field_for_field():
    from support.fork_schema import fork_descriptor

    fork = fork_descriptor()
    ours = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(ours)
    assert (ours.package, ours.syntax or "proto2") == (fork.package, fork.syntax or "proto2")
    fork_messages, fork_enums = _by_name(fork)
    our_messages, our_enums = _by_name(ours)
    own = {f.type_name.rsplit(".", 1)[-1] for f in our_messages["LayerParameter"].field
           if f.number in OWN_RANGE}
    problems = []
    for name, fork_message in fork_messages.items():
        if name not in our_messages:
            problems.append(f"message {name} missing")
            continue
        our_fields = {f.name: f for f in our_messages[name].field}
        for f in fork_message.field:
            g = our_fields.pop(f.name, None)
            if g is None:
                problems.append(f"{name}.{f.name} = {f.number} missing")
                continue
            for attr in ("number", "label", "type", "type_name"):
                if getattr(f, attr) != getattr(g, attr):
                    problems.append(f"{name}.{f.name}: {attr} {getattr(g, attr)!r}, fork {getattr(f, attr)!r}")
            if _default(f) != _default(g):
                problems.append(f"{name}.{f.name}: default {_default(g)!r}, fork {_default(f)!r}")
            if (f.options.HasField("packed"), f.options.packed) != (g.options.HasField("packed"), g.options.packed):
                problems.append(f"{name}.{f.name}: packed differs")
        for extra in our_fields.values():
            if not ((name, extra.name) in OPENCV_EXTRAS
                    or (name == "LayerParameter" and extra.number in OWN_RANGE)):
                problems.append(f"{name}.{extra.name} = {extra.number} is not the fork's")
    for name in our_messages.keys() - fork_messages.keys():
        if name.split(".")[0] not in own:
            problems.append(f"message {name} is not the fork's nor one of our own layers'")
    for name, fork_enum in fork_enums.items():
        values = [(v.name, v.number) for v in fork_enum.value]
        if name not in our_enums or [(v.name, v.number) for v in our_enums[name].value] != values:
            problems.append(f"enum {name} differs from the fork's {values}")
    for name in our_enums.keys() - fork_enums.keys():
        if name.split(".")[0] not in own:
            problems.append(f"enum {name} is not the fork's")
    assert not problems, "\n".join(problems)


def test_fork_schema_fixture_is_the_packages_descriptor():
    """The committed fixture equals the descriptor in the caffe-ssd 0.1 wheel, when one is at hand."""
    from support.fork_schema import FIXTURE, serialized_from_wheel

    wheel = os.environ.get("CAFFE_SSD_WHEEL")
    if not wheel:
        pytest.skip("set CAFFE_SSD_WHEEL to caffe_ssd-0.1-py3-none-any.whl "
                    "(pip download --no-deps caffe-ssd==0.1) to re-check the committed fixture")
    assert serialized_from_wheel(wheel) == FIXTURE.read_bytes()
