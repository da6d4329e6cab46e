"""SSD augmentation steps with fixed seeds (deeper_ssd.data.transforms)."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from deeper_ssd.data import transforms as T
from deeper_ssd.data.loader import label_rows
from deeper_ssd.proto import caffe_pb2

f32 = np.float32
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def param(text: str = "") -> caffe_pb2.TransformationParameter:
    return text_format.Parse(text, caffe_pb2.TransformationParameter())


def samplers(text: str):
    return list(text_format.Parse(text, caffe_pb2.AnnotatedDataParameter()).batch_sampler)


def make_sample(boxes, image=None, encoded=True):
    """A record: a 400x300 image (gradient + noise, or ``image``) with label-1 objects."""
    if image is None:
        rng = np.random.default_rng(5)
        yy, xx = np.mgrid[0:300, 0:400]
        image = np.dstack([xx % 256, yy % 256, (xx + yy) % 256]).astype(np.uint8)
        image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
    boxes = np.asarray(boxes, f32).reshape(-1, 4)
    n = len(boxes)
    objects = T.Objects(np.ones(n, np.int32), np.arange(n, dtype=np.int32), boxes, np.zeros(n, bool))
    data = T.encode_jpeg(image) if encoded else image
    return T.Sample(data, encoded, objects, True, "test-record")


def test_expand_keeps_boxes_on_the_same_pixels():
    sample = make_sample([[0.1, 0.2, 0.5, 0.6], [0.6, 0.1, 0.9, 0.95]])
    original = T.decode_image(sample.image)
    t = T.SSDTransformer(param("mean_value: 104 mean_value: 117 mean_value: 123 "
                               "expand_param { prob: 1 max_expand_ratio: 3 }"))
    out = t.expand(sample, np.random.default_rng(0))
    canvas = T.decode_image(out.image)
    H, W = canvas.shape[:2]
    assert (H, W) != (300, 400) and H >= 300 and W >= 400
    old_px = sample.objects.boxes * np.array([400, 300, 400, 300], f32)
    new_px = out.objects.boxes * np.array([W, H, W, H], f32)
    offset = new_px - old_px                   # one integer translation for every corner
    assert np.allclose(offset, offset[0], atol=1e-2)
    dx, dy = np.rint(offset[0, :2]).astype(int)
    assert np.allclose(offset[0], [dx, dy, dx, dy], atol=1e-2)
    # the image sits at that offset (JPEG-close), the rest of the canvas is the mean colour
    pasted = canvas[dy:dy + 300, dx:dx + 400].astype(int)
    assert np.abs(pasted - original.astype(int)).mean() < 3
    corner = canvas[0, 0] if (dx, dy) != (0, 0) else canvas[-1, -1]
    assert np.abs(corner.astype(int) - [104, 117, 123]).max() <= 3
    assert np.array_equal(out.objects.instances, [0, 1])


def test_expand_probability_and_refusals():
    sample = make_sample([[0.1, 0.1, 0.2, 0.2]])
    t = T.SSDTransformer(param("expand_param { prob: 0 max_expand_ratio: 4 }"))
    assert t.expand(sample, np.random.default_rng(0)) is sample
    with pytest.raises(T.TransformError, match="max_expand_ratio must be > 1"):
        T.SSDTransformer(param("expand_param { prob: 1 }"))
    with pytest.raises(T.TransformError, match="mean_file"):
        T.SSDTransformer(param('mean_file: "m.binaryproto" expand_param { max_expand_ratio: 2 }'))


def test_every_accepted_crop_satisfies_min_jaccard_overlap():
    boxes = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]], f32)
    bs = samplers("batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 "
                  "max_aspect_ratio: 2 } sample_constraint { min_jaccard_overlap: 0.5 } "
                  "max_sample: 1 max_trials: 50 }")
    accepted = 0
    for seed in range(40):
        found = T.generate_batch_samples(boxes, bs, np.random.default_rng(seed))
        assert len(found) <= 1                     # max_sample
        for sample in found:
            accepted += 1
            assert T.jaccard_overlap(sample, boxes).max() >= 0.5
            w, h = sample[2] - sample[0], sample[3] - sample[1]
            assert 0 <= sample[0] and sample[2] <= 1 + 1e-6 and 0 <= sample[1] and sample[3] <= 1 + 1e-6
            scale = np.sqrt(w * h)
            assert 0.3 - 1e-5 <= scale <= 1 + 1e-5 and 0.5 - 1e-4 <= w / h <= 2 + 1e-4
    assert accepted > 10


def test_sampler_without_constraint_and_the_whole_image_sampler():
    whole = samplers("batch_sampler { max_sample: 1 max_trials: 1 }")
    [box] = T.generate_batch_samples(np.zeros((0, 4), f32), whole, np.random.default_rng(0))
    assert np.array_equal(box, [0, 0, 1, 1])
    empty = samplers("batch_sampler { }")                 # the SSD test layer: 100 whole images
    assert len(T.generate_batch_samples(np.zeros((0, 4), f32), empty, np.random.default_rng(0))) == 100
    # with a constraint, an image without objects accepts nothing
    constrained = samplers("batch_sampler { sample_constraint { max_jaccard_overlap: 1 } }")
    assert T.generate_batch_samples(np.zeros((0, 4), f32), constrained, np.random.default_rng(0)) == []


def test_first_configured_constraint_decides():
    """The fork's SatisfySampleConstraint keeps ``found`` once the jaccard test passed, so a
    failing sample-coverage test on the same object does not reject the sample."""
    sample = np.array([0.0, 0.0, 0.5, 0.5], f32)
    boxes = np.array([[0.0, 0.0, 0.4, 0.4]], f32)          # IoU 0.64, sample coverage 0.64
    c = caffe_pb2.SampleConstraint(min_jaccard_overlap=0.5, min_sample_coverage=0.9)
    assert T.satisfy_sample_constraint(sample, boxes, c)
    assert not T.satisfy_sample_constraint(sample, boxes, caffe_pb2.SampleConstraint(min_sample_coverage=0.9))
    assert not T.satisfy_sample_constraint(sample, boxes, caffe_pb2.SampleConstraint(min_jaccard_overlap=0.7))
    assert T.satisfy_sample_constraint(sample, boxes, caffe_pb2.SampleConstraint(max_object_coverage=1.0))


def test_crop_with_emit_constraint_center():
    boxes = [[0.05, 0.05, 0.25, 0.25],      # centre (0.15, 0.15): outside the crop -> dropped
             [0.3, 0.3, 0.7, 0.7],          # inside -> kept
             [0.4, 0.05, 0.6, 0.45]]        # centre (0.5, 0.25) inside, box clipped at the top
    sample = make_sample(boxes)
    crop = np.array([0.2, 0.2, 0.8, 0.8], f32)
    t = T.SSDTransformer(param("emit_constraint { emit_type: CENTER }"))
    out = t.crop(sample, crop)
    img = T.decode_image(out.image)
    assert img.shape[:2] == (int(f32(0.8) * 300 - f32(0.2) * 300), int(f32(0.8) * 400 - f32(0.2) * 400))
    assert np.array_equal(out.objects.instances, [1, 2])
    assert np.allclose(out.objects.boxes[0], [1 / 6, 1 / 6, 5 / 6, 5 / 6], atol=1e-6)
    assert np.allclose(out.objects.boxes[1], [1 / 3, 0, 2 / 3, 0.25 / 0.6], atol=1e-6)
    # without an emit constraint the first box survives, clipped to the crop
    plain = T.SSDTransformer(param()).crop(sample, crop)
    assert np.array_equal(plain.objects.instances, [0, 1, 2])
    assert np.allclose(plain.objects.boxes[0], [0, 0, 0.05 / 0.6, 0.05 / 0.6], atol=1e-6)
    # MIN_OVERLAP keeps a box whose covered fraction exceeds emit_overlap
    overlap = T.SSDTransformer(param("emit_constraint { emit_type: MIN_OVERLAP emit_overlap: 0.5 }"))
    assert np.array_equal(overlap.crop(sample, crop).objects.instances, [1, 2])


def test_crop_pixels_are_the_image_window():
    sample = make_sample([[0.3, 0.3, 0.6, 0.6]], encoded=False)
    out = T.SSDTransformer(param()).crop(sample, np.array([0.25, 0.1, 0.75, 0.6], f32))
    assert not out.encoded and np.array_equal(out.image, sample.image[30:180, 100:300])


def test_mirror_flips_xmin_xmax():
    sample = make_sample([[0.1, 0.2, 0.3, 0.5]], encoded=False)
    t = T.SSDTransformer(param("mirror: true"))
    flipped = same = 0
    for seed in range(12):
        data, objects = t.transform(sample, np.random.default_rng(seed))
        if np.array_equal(data, sample.image.transpose(2, 0, 1)[:, :, ::-1]):
            flipped += 1
            assert np.allclose(objects.boxes, [[1 - 0.3, 0.2, 1 - 0.1, 0.5]])
        else:
            same += 1
            assert np.array_equal(data, sample.image.transpose(2, 0, 1))
            assert np.array_equal(objects.boxes, sample.objects.boxes)
    assert flipped and same


def test_mean_scale_chw_and_crop_size():
    sample = make_sample([[0.1, 0.1, 0.9, 0.9]], encoded=False)
    t = T.SSDTransformer(param("mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5 crop_size: 100"))
    data, objects = t.transform(sample, np.random.default_rng(0))
    window = sample.image[100:200, 150:250].astype(f32)        # TEST: centred crop
    expected = (window - np.array([10, 20, 30], f32)).transpose(2, 0, 1) * f32(0.5)
    assert data.dtype == np.float32 and np.array_equal(data, expected)
    assert np.allclose(objects.boxes, [[0, 0, 1, 1]])           # projected into the crop, clipped
    single = T.SSDTransformer(param("mean_value: 100"))
    data, _ = single.transform(sample, np.random.default_rng(0))
    assert np.array_equal(data, sample.image.transpose(2, 0, 1).astype(f32) - 100)


@pytest.mark.parametrize("interp", ["LINEAR", "AREA", "NEAREST", "CUBIC", "LANCZOS4"])
def test_warp_with_each_interpolation(interp):
    sample = make_sample([[0.1, 0.2, 0.3, 0.5]])
    t = T.SSDTransformer(param(f"resize_param {{ resize_mode: WARP height: 150 width: 120 interp_mode: {interp} }}"))
    data, objects = t.transform(sample, np.random.default_rng(0))
    flag = getattr(cv2, f"INTER_{interp}")
    expected = cv2.resize(T.decode_image(sample.image), (120, 150), interpolation=flag)
    assert np.array_equal(data, expected.transpose(2, 0, 1).astype(f32))
    assert np.allclose(objects.boxes, sample.objects.boxes, atol=1e-6)


def test_fit_large_size_and_pad_modes():
    sample = make_sample([[0.0, 0.0, 1.0, 1.0]])                     # 400x300 -> 200x200
    for mode, corner in (("CONSTANT", [7, 8, 9]), ("MIRRORED", None), ("REPEAT_NEAREST", None)):
        t = T.SSDTransformer(param(f"resize_param {{ resize_mode: FIT_LARGE_SIZE_AND_PAD height: 200 "
                                   f"width: 200 pad_mode: {mode} pad_value: 7 pad_value: 8 pad_value: 9 }}"))
        data, objects = t.transform(sample, np.random.default_rng(0))
        assert data.shape == (3, 200, 200)
        if corner:
            assert np.array_equal(data[:, 0, 0], corner)
        # the image occupies rows 25..175: the box becomes [0, 0.125, 1, 0.875]
        assert np.allclose(objects.boxes, [[0, 0.125, 1, 0.875]], atol=1e-6)
    portrait = make_sample([[0.0, 0.0, 1.0, 1.0]], image=np.zeros((400, 300, 3), np.uint8))
    t = T.SSDTransformer(param("resize_param { resize_mode: FIT_LARGE_SIZE_AND_PAD height: 200 width: 200 }"))
    _, objects = t.transform(portrait, np.random.default_rng(0))
    assert np.allclose(objects.boxes, [[0.125, 0, 0.875, 1]], atol=1e-6)


def test_fit_small_size_and_extrapolation():
    sample = make_sample([[0.25, 0.25, 0.5, 0.5]])
    t = T.SSDTransformer(param("resize_param { resize_mode: FIT_SMALL_SIZE height: 150 width: 150 }"))
    assert t.output_shape() == (3, -1, -1)
    data, objects = t.transform(sample, np.random.default_rng(0))
    assert data.shape == (3, 150, 200)
    assert np.allclose(objects.boxes, sample.objects.boxes, atol=1e-6)
    scaled = T.SSDTransformer(param("resize_param { resize_mode: FIT_SMALL_SIZE height: 150 width: 150 "
                                    "height_scale: 100 width_scale: 100 }"))
    _, objects = scaled.transform(sample, np.random.default_rng(0))
    assert np.allclose(objects.boxes, [[0.5, 0.375, 1.0, 0.75]], atol=1e-5)   # * 200/100, * 150/100


def test_distort_is_seeded_and_channel_shuffle_permutes():
    sample = make_sample([[0.1, 0.1, 0.5, 0.5]])
    full = param("distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 "
                 "contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5 "
                 "saturation_lower: 0.5 saturation_upper: 1.5 random_order_prob: 0 }")
    t = T.SSDTransformer(full)
    one = t.distort(sample, np.random.default_rng(1)).image
    assert one == t.distort(sample, np.random.default_rng(1)).image
    assert len({t.distort(sample, np.random.default_rng(s)).image for s in range(6)}) > 1
    # all probabilities 0: only the JPEG round trip of the fork's DistortImage
    idle = T.SSDTransformer(param("distort_param { }")).distort(sample, np.random.default_rng(0))
    assert idle.image == T.encode_jpeg(T.decode_image(sample.image))
    img = T.decode_image(sample.image)
    shuffled = T.apply_distort(img, caffe_pb2.DistortionParameter(random_order_prob=1.0), np.random.default_rng(3))
    assert sorted(shuffled.reshape(-1, 3).sum(0).tolist()) == sorted(img.reshape(-1, 3).sum(0).tolist())
    bright = T.apply_distort(np.full((2, 2, 3), 250, np.uint8),
                             caffe_pb2.DistortionParameter(brightness_prob=1, brightness_delta=32),
                             np.random.default_rng(0))
    assert bright.max() <= 255                                        # saturating


@pytest.mark.parametrize("option", ["hist_eq: true", "inverse: true", "decolorize: true", "gauss_blur: true",
                                    "jpeg: 50", "posterize: true", "erode: true", "clahe: true",
                                    "convert_to_hsv: true",
                                    "saltpepper: true saltpepper_param { fraction: 0.1 value: 255 }"])
def test_noise_options(option):
    sample = make_sample([[0.1, 0.1, 0.5, 0.5]])
    t = T.SSDTransformer(param(f"noise_param {{ {option} }}"))
    data, _ = t.transform(sample, np.random.default_rng(0))
    plain, _ = T.SSDTransformer(param()).transform(sample, np.random.default_rng(0))
    assert data.shape == plain.shape and not np.array_equal(data, plain)
    if option == "inverse: true":
        assert np.array_equal(data, 255 - plain)
    if option == "posterize: true":
        assert set(np.unique(data)) <= {32, 96, 160, 224}


@pytest.mark.parametrize("text, message", [
    ("noise_param { convert_to_lab: true }", "convert_to_lab is refused"),
    ("noise_param { saltpepper: true }", "saltpepper needs"),
    ("force_color: true force_gray: true", "exclusive"),
    ("resize_param { height: 300 }", "height > 0 and width > 0"),
    ('mean_file: "x" mean_value: 1', "not both"),
])
def test_unsupported_or_invalid_settings_are_refused(text, message):
    with pytest.raises(T.TransformError, match=message):
        T.SSDTransformer(param(text))


def test_invalid_sampler_is_refused():
    with pytest.raises(T.TransformError, match="min_scale"):
        T.SSDTransformer(param(), caffe_pb2.TRAIN, samplers("batch_sampler { sampler { min_scale: 0 } }"))


def test_raw_records_are_not_resized_like_the_fork():
    sample = make_sample([[0.1, 0.1, 0.5, 0.5]], encoded=False)
    t = T.SSDTransformer(param("resize_param { height: 300 width: 300 }"))
    with pytest.raises(T.TransformError, match="test-record.*rebuild the LMDB with --encoded"):
        t.transform(sample, np.random.default_rng(0))
    with pytest.raises(T.TransformError, match="need encoded records"):
        T.SSDTransformer(param("expand_param { max_expand_ratio: 2 }")).process(sample, np.random.default_rng(0))


def test_full_ssd_train_pipeline_on_the_real_photo():
    image = cv2.imread(str(FIXTURES / "voc_dining.jpg"))
    sample = T.Sample((FIXTURES / "voc_dining.jpg").read_bytes(), True,
                      T.Objects(np.ones(2, np.int32), np.arange(2, dtype=np.int32),
                                np.array([[0.442, 0.683, 0.52, 0.92], [0.082, 0.096, 0.302, 0.472]], f32),
                                np.array([False, True])), True, "voc")
    assert image is not None
    p = param("mirror: true mean_value: 104 mean_value: 117 mean_value: 123 "
              "resize_param { resize_mode: WARP height: 300 width: 300 interp_mode: LINEAR interp_mode: AREA "
              "interp_mode: NEAREST interp_mode: CUBIC interp_mode: LANCZOS4 } emit_constraint { emit_type: CENTER } "
              "distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 contrast_lower: 0.5 "
              "contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5 saturation_lower: 0.5 "
              "saturation_upper: 1.5 } expand_param { prob: 0.5 max_expand_ratio: 4 }")
    bs = samplers("batch_sampler { max_sample: 1 max_trials: 1 } batch_sampler { sampler { min_scale: 0.3 "
                  "max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 } sample_constraint { "
                  "min_jaccard_overlap: 0.3 } max_sample: 1 max_trials: 50 }")
    t = T.SSDTransformer(p, caffe_pb2.TRAIN, bs)
    for seed in range(8):
        data, objects = t.process(sample, np.random.default_rng(seed))
        assert data.shape == (3, 300, 300) and data.dtype == np.float32
        assert np.all((objects.boxes >= 0) & (objects.boxes <= 1))
        assert np.all(objects.boxes[:, 2] > objects.boxes[:, 0])
        second = t.process(sample, np.random.default_rng(seed))
        assert np.array_equal(data, second[0]) and np.array_equal(objects.boxes, second[1].boxes)


def test_label_rows_layout():
    a = T.Objects(np.array([3, 3], np.int32), np.array([0, 1], np.int32),
                  np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.7]], f32), np.array([False, True]))
    rows = label_rows([T.Objects.empty(), a])
    assert rows.dtype == np.float32 and rows.shape == (2, 8)
    assert np.allclose(rows[1], [1, 3, 1, 0.5, 0.5, 0.6, 0.7, 1])
    assert np.array_equal(label_rows([T.Objects.empty()]), -np.ones((1, 8), f32))
