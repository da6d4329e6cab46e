"""DetectionEvaluate: count rows, tp/fp rules (duplicates, difficult objects, argmax over all
objects), ordering, the pixel-space VOC "+1" IoU with name_size_file and its line counter;
parity with real Caffe where the pinned fork and the oracle build agree."""
import numpy as np
import pytest
import torch

from deeper_ssd.layers import LayerError
from deeper_ssd.layers.detection_evaluate import DetectionEvaluate
from support.layers import layer_param


def assert_rows(rows, expected):
    np.testing.assert_allclose(np.asarray(rows), np.asarray(expected, dtype=np.float64), rtol=1e-6)


def layer_text(fields):
    return (f'name: "ev" type: "DetectionEvaluate" bottom: "det" bottom: "label" top: "out" '
            f'detection_evaluate_param {{ {fields} }}')


def make(fields, d=-1, g=-1):
    return DetectionEvaluate(layer_param(layer_text(fields)), [(1, 1, d, 7), (1, 1, g, 8)])


def evaluate(layer, dets, gts):
    dets = torch.tensor(dets, dtype=torch.float32).view(1, 1, -1, 7)
    gts = torch.tensor(gts, dtype=torch.float32).view(1, 1, -1, 8)
    out = layer(dets, gts)
    assert out.shape[:2] == (1, 1) and out.shape[3] == 5
    return out[0, 0].tolist()


GTS = [[0, 1, 0, 0.1, 0.1, 0.5, 0.5, 0],       # object 0 of class 1
       [0, 1, 1, 0.6, 0.6, 0.9, 0.9, 1],       # object 1 of class 1, difficult
       [1, 2, 0, 0.0, 0.0, 0.3, 0.3, 0]]       # image 1, class 2
DETS = [[0, 1, 0.4, 0.1, 0.1, 0.5, 0.52],      # second-best on object 0: duplicate -> fp
        [0, 1, 0.9, 0.1, 0.1, 0.5, 0.5],       # object 0 -> tp
        [0, 1, 0.7, 0.6, 0.6, 0.9, 0.9],       # difficult object -> ignored or tp
        [0, 1, 0.3, 0.0, 0.7, 0.2, 0.9],       # no overlap -> fp
        [0, 2, 0.5, 0.0, 0.0, 0.3, 0.3],       # image 0 has no class 2 -> fp, input order
        [0, 2, 0.8, 0.5, 0.5, 0.6, 0.6],
        [2, 3, 0.6, 0.0, 0.0, 0.1, 0.1]]       # image without objects -> fp


def test_rows_difficult_ignored():
    rows = evaluate(make("num_classes: 4 evaluate_difficult_gt: false"), DETS, GTS)
    assert_rows(rows, [[-1, 1, 1, -1, -1], [-1, 2, 1, -1, -1], [-1, 3, 0, -1, -1],
                       [0, 1, 0.9, 1, 0], [0, 1, 0.7, 0, 0], [0, 1, 0.4, 0, 1], [0, 1, 0.3, 0, 1],
                       [0, 2, 0.5, 0, 1], [0, 2, 0.8, 0, 1],
                       [2, 3, 0.6, 0, 1]])


def test_rows_difficult_evaluated():
    rows = evaluate(make("num_classes: 4"), DETS, GTS)
    assert rows[0] == [-1, 1, 2, -1, -1]
    assert rows[4] == pytest.approx([0, 1, 0.7, 1, 0])


def test_best_object_is_chosen_among_all_even_if_used():
    gts = [[0, 1, 0, 0.0, 0.0, 0.4, 0.4, 0], [0, 1, 0, 0.0, 0.0, 0.4, 0.5, 0]]
    dets = [[0, 1, 0.9, 0.0, 0.0, 0.4, 0.4], [0, 1, 0.8, 0.0, 0.0, 0.4, 0.41]]
    rows = evaluate(make("num_classes: 2"), dets, gts)
    # the second detection's best object (IoU 0.975) is already used; object 1 (IoU 0.82) is not
    # considered -> false positive
    assert_rows(rows[1:], [[0, 1, 0.9, 1, 0], [0, 1, 0.8, 0, 1]])


def test_filler_rows_are_skipped_and_ground_truth_stops_at_minus_one():
    layer = make("num_classes: 3")
    rows = evaluate(layer, [[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]],
                    [[0, 1, 0, 0, 0, 1, 1, 0], [-1] * 8, [0, 2, 0, 0, 0, 1, 1, 0]])
    assert rows == [[-1, 1, 1, -1, -1], [-1, 2, 0, -1, -1]]


def test_overlap_threshold_is_inclusive():
    gts = [[0, 1, 0, 0.0, 0.0, 1.0, 1.0, 0]]
    rows = evaluate(make("num_classes: 2 overlap_threshold: 0.5"), [[0, 1, 0.9, 0.0, 0.0, 1.0, 0.5]], gts)
    assert rows[1] == pytest.approx([0, 1, 0.9, 1, 0])


def test_pixel_mode_uses_voc_areas_and_advances_per_image(tmp_path):
    sizes = tmp_path / "name_size.txt"
    sizes.write_text("a 10 10\nb 100 100\n")
    layer = make(f'num_classes: 2 name_size_file: "{sizes}"')
    gts = [[0, 1, 0, 0.0, 0.0, 0.4, 0.4, 0], [1, 1, 0, 0.0, 0.0, 0.4, 0.4, 0]]
    # in pixels of a 10x10 image: object 0..4 (5 px), detection 0..2.5 -> (3.5 * 3.5) / 25 = 0.49
    # of a 100x100 image: 0..40 vs 0..25 -> 26^2 / 41^2 = 0.40; normalised it would be 0.39
    dets = [[0, 1, 0.9, 0.0, 0.0, 0.25, 0.25], [1, 1, 0.9, 0.0, 0.0, 0.25, 0.25]]
    rows = evaluate(layer, dets, gts)
    assert_rows(rows[1:], [[0, 1, 0.9, 0, 1], [1, 1, 0.9, 0, 1]])
    loose = make(f'num_classes: 2 name_size_file: "{sizes}" overlap_threshold: 0.45')
    rows = evaluate(loose, dets, gts)
    assert_rows(rows[1:], [[0, 1, 0.9, 1, 0], [1, 1, 0.9, 0, 1]])   # 0.49 >= 0.45 > 0.40
    # the line counter is at 0 again (two images, two lines): the next call starts with "a" again;
    # an image with only a filler row still takes a line
    rows = evaluate(loose, [[0, -1, -1, -1, -1, -1, -1], [1, 1, 0.9, 0.0, 0.0, 0.25, 0.25]], gts)
    assert rows[-1] == pytest.approx([1, 1, 0.9, 0, 1])                          # image 1 used "b"
    rows = evaluate(loose, [[1, 1, 0.9, 0.0, 0.0, 0.25, 0.25]], gts)
    assert rows[-1] == pytest.approx([1, 1, 0.9, 1, 0])                          # now "a"


def test_pixel_mode_clips_to_the_image(tmp_path):
    sizes = tmp_path / "name_size.txt"
    sizes.write_text("a 10 10\n")
    layer = make(f'num_classes: 2 name_size_file: "{sizes}"')
    rows = evaluate(layer, [[0, 1, 0.9, -0.5, -0.5, 0.4, 0.4]], [[0, 1, 0, 0.0, 0.0, 0.4, 0.4, 0]])
    assert rows[1] == pytest.approx([0, 1, 0.9, 1, 0])                           # clipped: identical


@pytest.mark.parametrize("fields,message", [
    ("", "num_classes"), ("num_classes: 2 background_label_id: 2", "background_label_id"),
    ("num_classes: 2 overlap_threshold: 0", "overlap_threshold"),
])
def test_bad_configuration_is_refused(fields, message):
    with pytest.raises(LayerError, match=message):
        make(fields)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(LayerError, match="background label"):
        evaluate(make("num_classes: 2"), [[0, 0, 0.9, 0, 0, 1, 1]], [[0, 1, 0, 0, 0, 1, 1, 0]])
    with pytest.raises(LayerError, match="background label"):
        evaluate(make("num_classes: 2"), [[0, 1, 0.9, 0, 0, 1, 1]], [[0, 0, 0, 0, 0, 1, 1, 0]])
    with pytest.raises(LayerError, match="name_size_file"):
        evaluate(make(f'num_classes: 2 name_size_file: "{tmp_path / "none"}"'), [[0, 1, 0.9, 0, 0, 1, 1]],
                 [[0, 1, 0, 0, 0, 1, 1, 0]])
    with pytest.raises(LayerError, match="1x1xDx7"):
        DetectionEvaluate(layer_param(layer_text("num_classes: 2")), [(1, 1, 5, 6), (1, 1, 2, 8)])


def test_shape_rule():
    assert make("num_classes: 21").top_shapes == [(1, 1, -1, 5)]


def random_eval_batch(rng, n=4, c=5):
    gts = []
    for i in range(n):
        for _ in range(rng.integers(0, 5)):
            q, w = rng.uniform(0, 0.6, 2), rng.uniform(0.1, 0.4, 2)
            gts.append([i, rng.integers(1, c), 0, *q, *(q + w), rng.integers(0, 2)])
    dets = []
    for i in range(n):
        for _ in range(rng.integers(1, 12)):
            if gts and rng.random() < 0.6:
                g = gts[rng.integers(len(gts))]
                b = np.array(g[3:7]) + rng.normal(0, 0.05, 4)
                label = g[1] if rng.random() < 0.8 else rng.integers(1, c)
            else:
                q = rng.uniform(0, 0.6, 2)
                b, label = np.concatenate([q, q + rng.uniform(0.1, 0.4, 2)]), rng.integers(1, c)
            # inside [0, 1]: the oracle build scales without clipping (the pinned fork clips)
            dets.append([i, label, np.round(rng.uniform(0, 1), 1), *np.clip(b, 0, 1)])
    return (np.array(dets, np.float32).reshape(1, 1, -1, 7),
            np.array(gts or [[-1] * 8], np.float32).reshape(1, 1, -1, 8))


def test_matches_caffe(oracle, tmp_path):
    """Three nets, three forwards each (the name/size line counter carries over and wraps)."""
    rng = np.random.default_rng(5)
    configs = ["", "evaluate_difficult_gt: false overlap_threshold: 0.3",
               'evaluate_difficult_gt: false name_size_file: "ns.txt"']
    name_sizes = "a 375 500\nb 333 500\nc 500 281\nd 77 91\ne 640 480\n"
    (tmp_path / "ns.txt").write_text(name_sizes)
    files = {"ns.txt": name_sizes}
    batches = [[random_eval_batch(rng) for _ in range(3)] for _ in configs]
    for c, fields in enumerate(configs):
        for f, (det, gt) in enumerate(batches[c]):
            files[f"det{c}_{f}.npy"], files[f"gt{c}_{f}.npy"] = det, gt
        files[f"net{c}.prototxt"] = "\n".join(
            [f'layer {{ name: "in_{b}" type: "Input" top: "{b}" input_param {{ shape {{ dim: 1 dim: 1 dim: 1 '
             f'dim: {w} }} }} }}' for b, w in (("det", 7), ("label", 8))] + [f"layer {{ {layer_text('num_classes: 5 ' + fields)} }}"])
    out = oracle.run(f"""
for c in range({len(configs)}):
    net = caffe.Net("net%d.prototxt" % c, caffe.TEST)
    for f in range(3):
        det, gt = np.load("det%d_%d.npy" % (c, f)), np.load("gt%d_%d.npy" % (c, f))
        net.blobs["det"].reshape(*det.shape)
        net.blobs["label"].reshape(*gt.shape)
        net.blobs["det"].data[...] = det
        net.blobs["label"].data[...] = gt
        net.forward()
        out["r%d_%d" % (c, f)] = net.blobs["out"].data.copy()
""", files)
    for c, fields in enumerate(configs):
        layer = make("num_classes: 5 " + fields.replace('"ns.txt"', f'"{tmp_path / "ns.txt"}"'))
        for f, (det, gt) in enumerate(batches[c]):
            ours = layer(torch.tensor(det), torch.tensor(gt)).numpy()
            np.testing.assert_array_equal(ours, out[f"r{c}_{f}"], err_msg=f"{fields} forward {f}")
