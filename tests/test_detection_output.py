"""DetectionOutput: Caffe's thresholds, top_k before NMS, NMS keeping IoU <= threshold, eta,
keep_top_k across classes, no clipping, the no-detection rows, result files; parity with real
Caffe (row for row) and with OpenCV's importer."""
import json

import numpy as np
import pytest
import torch

from deeper_ssd.layers import LayerError
from deeper_ssd.layers.detection_output import DetectionOutput
from support.layers import layer_param, run_caffe_cases
from support.multibox import prior_blob


def layer_text(fields):
    return (f'name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
            f'detection_output_param {{ {fields} }}')


def make(fields, k, c, n=1, loc_classes=1, device=None):
    return DetectionOutput(layer_param(layer_text(fields)), [(n, 4 * k * loc_classes), (n, k * c), (1, 2, 4 * k)],
                           device=device)


def detect(fields, priors, scores, loc=None, loc_classes=1, dtype=torch.float32):
    """Rows of DetectionOutput for ``scores [N, K, C]`` on ``priors`` (loc 0 = the priors)."""
    scores = torch.as_tensor(scores, dtype=dtype)
    n, k, c = scores.shape
    loc = torch.zeros(n, 4 * k * loc_classes, dtype=dtype) if loc is None else torch.as_tensor(loc, dtype=dtype)
    out = make(fields, k, c, n, loc_classes)(loc, scores.reshape(n, -1), prior_blob(priors))
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and out.dtype == dtype
    return out[0, 0].tolist()


NMS = "num_classes: 2 code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 } "
# X and Y overlap (IoU 0.6), Z is apart
XYZ = [[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.34], [0.6, 0.6, 0.9, 0.9]]


def scores_for(*class1):
    return [[[1 - s, s] for s in class1]]


def test_score_must_be_strictly_above_the_threshold():
    rows = detect(NMS + "confidence_threshold: 0.5", XYZ, scores_for(0.5, 0.1, 0.75))
    assert [r[:3] for r in rows] == [[0, 1, 0.75]]


def test_top_k_is_applied_before_nms():
    rows = detect("num_classes: 2 code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 top_k: 2 }", XYZ,
                  scores_for(0.9, 0.8, 0.7))
    assert [r[2] for r in rows] == pytest.approx([0.9])          # Y suppressed, Z cut by top_k
    rows = detect(NMS, XYZ, scores_for(0.9, 0.8, 0.7))
    assert [r[2] for r in rows] == pytest.approx([0.9, 0.7])


def test_nms_keeps_iou_equal_to_the_threshold_and_adapts_with_eta():
    boxes = [[0, 0, 1, 1], [0, 0, 1, 0.5], [0, 0, 1, 0.45]]        # IoU with the first: 0.5, 0.45
    probs = scores_for(0.9, 0.8, 0.7)
    rows = detect("num_classes: 2 nms_param { nms_threshold: 0.5 }", boxes, probs)
    assert [r[2] for r in rows] == pytest.approx([0.9, 0.8])
    rows = detect("num_classes: 2 nms_param { nms_threshold: 0.6 eta: 0.8 }", boxes, probs)
    assert [r[2] for r in rows] == pytest.approx([0.9, 0.7])       # 0.6 -> 0.48 after the first box


def test_keep_top_k_across_classes_then_grouped_by_class():
    priors = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.3, 0.0, 0.45, 0.2]]
    probs = [[[0.1, 0.5, 0.4], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]]]
    fields = "num_classes: 3 code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 } confidence_threshold: 0.3 "
    rows = detect(fields, priors, probs)
    assert [v for r in rows for v in r[1:3]] == pytest.approx([1, 0.7, 1, 0.5, 2, 0.6, 2, 0.4])
    rows = detect(fields + "keep_top_k: 2", priors, probs)
    assert [v for r in rows for v in r[1:3]] == pytest.approx([1, 0.7, 2, 0.6])
    rows = detect(fields + "keep_top_k: 0", priors, probs)
    assert rows == [[0, -1, -1, -1, -1, -1, -1]]


def test_rows_are_ordered_by_image_class_and_nms_order():
    probs = [scores_for(0.3, 0.05, 0.9)[0], scores_for(0.6, 0.02, 0.01)[0]]
    rows = detect(NMS + "confidence_threshold: 0.04", XYZ, probs)
    # image 0: Z 0.9, X 0.3 (Y 0.05 overlaps X); image 1: X 0.6 (Y overlaps, Z under the threshold)
    assert [v for r in rows for v in (r[0], r[2])] == pytest.approx([0, 0.9, 0, 0.3, 1, 0.6])


def test_boxes_are_decoded_and_not_clipped():
    loc = torch.tensor([[5.0, 0.0, 1.0, 0.0]])                        # shift right by 5*0.1*w, widen
    rows = detect("num_classes: 2 code_type: CENTER_SIZE variance_encoded_in_target: false nms_param {}",
                  [[0.6, 0.2, 1.0, 0.6]], [[[0.1, 0.9]]], loc=loc)
    w = 0.4 * np.exp(0.2)
    np.testing.assert_allclose(rows[0][3:], [1.0 - w / 2, 0.2, 1.0 + w / 2, 0.6], rtol=1e-6)
    assert rows[0][5] > 1


def test_no_detection_gives_one_filler_row_per_image():
    rows = detect(NMS + "confidence_threshold: 0.99", XYZ, [scores_for(0.5, 0.5, 0.5)[0]] * 3)
    assert rows == [[i, -1, -1, -1, -1, -1, -1] for i in range(3)]


def test_share_location_false_and_no_background():
    priors = [[0.1, 0.1, 0.3, 0.3]]
    loc = torch.zeros(1, 8)
    loc[0, 4] = 1.0                                                     # class 1's own box moves right
    rows = detect("num_classes: 2 share_location: false background_label_id: -1 code_type: CENTER_SIZE "
                  "variance_encoded_in_target: true nms_param {}", priors, [[[0.4, 0.6]]], loc=loc, loc_classes=2)
    assert [r[1] for r in rows] == [0, 1]
    np.testing.assert_allclose(rows[0][3:], [0.1, 0.1, 0.3, 0.3], atol=1e-7)
    np.testing.assert_allclose(rows[1][3:], [0.3, 0.1, 0.5, 0.3], atol=1e-7)


def test_float64_and_shape_only_setup():
    rows = detect(NMS, XYZ, scores_for(0.9, 0.1, 0.2), dtype=torch.float64)
    assert [r[2] for r in rows] == pytest.approx([0.9, 0.2])
    layer = make(NMS, 8732, 2, n=8, device="meta")
    assert layer.top_shapes == [(1, 1, -1, 7)]


@pytest.mark.parametrize("fields,message", [
    ("nms_param {}", "num_classes"),
    ("num_classes: 2 visualize: true", "visualize"),
    ("num_classes: 2 background_label_id: -1", "share_location: false"),
    ("num_classes: 2 nms_param { nms_threshold: -0.1 }", "nms_threshold"),
    ("num_classes: 2 nms_param { eta: 1.5 }", "eta"),
    ("num_classes: 3", "bottom 'conf'"),
    ("num_classes: 2 save_output_param { output_directory: 'x' label_map_file: 'l' name_size_file: 'n' "
     "output_format: 'PASCAL' }", "output_format"),
])
def test_bad_configuration_is_refused(fields, message):
    with pytest.raises(LayerError, match=message):
        make(fields, 3, 2)


# ---------------------------------------------------------------------------------------------
# result files

def test_voc_coco_and_ilsvrc_result_files(tmp_path):
    (tmp_path / "labelmap.prototxt").write_text(
        'item { name: "none_of_the_above" label: 0 }\nitem { name: "drone" label: 1 }\n'
        'item { name: "bird" label: 2 }\n')
    (tmp_path / "name_size.txt").write_text("img_a 100 200\nimg_b 50 40\nimg_c 10 10\n")
    priors = [[0.1, 0.2, 0.5, 0.61], [-0.2, 0.5, 0.3, 1.4]]
    probs = torch.tensor([[[0.1, 0.8, 0.1], [0.2, 0.1, 0.7]], [[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]])
    for fmt in ("VOC", "COCO", "ILSVRC"):
        out_dir = tmp_path / fmt
        fields = (f'num_classes: 3 nms_param {{}} confidence_threshold: 0.5 save_output_param {{ '
                  f'output_directory: "{out_dir}" output_name_prefix: "comp4_" output_format: "{fmt}" '
                  f'label_map_file: "{tmp_path / "labelmap.prototxt"}" '
                  f'name_size_file: "{tmp_path / "name_size.txt"}" num_test_image: 2 }}')
        layer = make(fields, 2, 3, n=2)
        layer(torch.zeros(2, 8), probs.reshape(2, -1), prior_blob(priors))
        if fmt == "VOC":
            assert sorted(p.name for p in out_dir.iterdir()) == ["comp4_bird.txt", "comp4_drone.txt"]
            # img_a: 200 x 100 -> x 20..100, y 20..61; clipped [0, 0.5, 0.3, 1] -> 0..60, 50..100
            assert (out_dir / "comp4_drone.txt").read_text() == "img_a 0.8 20 20 100 61\n"
            assert (out_dir / "comp4_bird.txt").read_text() == "img_a 0.7 0 50 60 100\nimg_b 0.8 4 10 20 30\n"
        elif fmt == "COCO":
            records = json.loads((out_dir / "comp4_.json").read_text())
            assert records[0] == {"image_id": "img_a", "category_id": "drone", "bbox": [20, 20, 80, 41],
                                  "score": pytest.approx(0.8)}
            assert len(records) == 3
        else:
            assert (out_dir / "comp4_.txt").read_text().splitlines()[2] == "img_b 2 0.8 4 10 20 30"


def test_result_files_need_their_inputs(tmp_path):
    fields = (f'num_classes: 2 nms_param {{}} save_output_param {{ output_directory: "{tmp_path / "o"}" '
              f'output_format: "VOC" label_map_file: "{tmp_path / "missing"}" name_size_file: "x" }}')
    layer = make(fields, 1, 2)
    with pytest.raises(LayerError, match="missing"):
        layer(torch.zeros(1, 4), torch.tensor([[0.5, 0.5]]), prior_blob([[0, 0, 1, 1]]))


# ---------------------------------------------------------------------------------------------
# peers

def random_inputs(seed, n=3, k=200, c=6, loc_classes=1):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.9, (k, 2))
    priors = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (k, 2))], 1)
    loc = rng.normal(0, 1, (n, 4 * k * loc_classes)).astype(np.float32)
    logits = rng.normal(0, 3, (n, k, c))
    prob = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    return [loc, prob.reshape(n, -1), prior_blob(priors).numpy()]


ORACLE_CASES = [
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 top_k: 100 } keep_top_k: 50 confidence_threshold: 0.01",
    "code_type: CORNER nms_param { nms_threshold: 0.3 } confidence_threshold: 0.2",
    "code_type: CORNER_SIZE share_location: false nms_param { nms_threshold: 0.6 eta: 0.8 top_k: 150 } "
    "keep_top_k: 30 background_label_id: -1 confidence_threshold: 0.05",
    "code_type: CENTER_SIZE share_location: false nms_param { nms_threshold: 0.45 top_k: 50 } "
    "background_label_id: 2 variance_encoded_in_target: true confidence_threshold: 0.1",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.45 } confidence_threshold: 0.9999",
    "code_type: CENTER_SIZE nms_param { nms_threshold: 0.7 eta: 0.9 } keep_top_k: 0",
]


def test_matches_caffe_row_for_row(oracle):
    cases = [dict(text=layer_text(f"num_classes: 6 {f}"),
                  bottoms=random_inputs(i, loc_classes=6 if "share_location: false" in f else 1))
             for i, f in enumerate(ORACLE_CASES)]
    for case, theirs, fields in zip(cases, run_caffe_cases(oracle, cases), ORACLE_CASES):
        ours = make(f"num_classes: 6 {fields}", 200, 6, 3, 6 if "share_location: false" in fields else 1)(
            *[torch.tensor(b) for b in case["bottoms"]]).numpy()
        assert ours.shape == theirs["tops"][0].shape, fields
        np.testing.assert_allclose(ours, theirs["tops"][0], atol=1e-7, err_msg=fields)


def test_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    fields = ("num_classes: 6 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
              "nms_param { nms_threshold: 0.45 top_k: 100 } keep_top_k: 60 confidence_threshold: 0.05")
    loc, conf, prior = random_inputs(11)
    inputs = "\n".join(f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ '
                       f'{" ".join(f"dim: {d}" for d in a.shape)} }} }} }}'
                       for n, a in (("loc", loc), ("conf", conf), ("prior", prior)))
    net = cv2.dnn.readNetFromCaffe(bytearray(f"{inputs}\nlayer {{ {layer_text(fields)} }}".encode()))
    for name, array in (("loc", loc), ("conf", conf), ("prior", prior)):
        net.setInput(array, name)
    theirs = net.forward("det").reshape(-1, 7)
    ours = make(fields, 200, 6, 3)(*[torch.tensor(b) for b in (loc, conf, prior)]).numpy().reshape(-1, 7)
    key = lambda rows: rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]  # noqa: E731
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(key(ours), key(theirs), atol=1e-5)
