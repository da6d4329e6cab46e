"""Drone and COCO-style datasets: VisDrone-DET text, COCO instances json, the fork's per-image
json through create-data, the list layouts of create-list, and an LMDB read back by the
AnnotatedData layer."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from deeper_ssd import cli, io
from deeper_ssd.data import lists
from deeper_ssd.data.annoset import AnnosetError, AnnotatedDB, ConvertOptions, build_annoset
from deeper_ssd.layers import registry
from deeper_ssd.proto import caffe_pb2

REPO = Path(__file__).resolve().parent.parent
VISDRONE_MAP = REPO / "data" / "labelmap_visdrone.prototxt"
AITOD_MAP = REPO / "data" / "labelmap_aitod.prototxt"
f32 = np.float32


def labels_of(path):
    return {item.name: item.label for item in io.read_labelmap(path).item}


def write_image(path, height, width, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


def records(db_path):
    db = AnnotatedDB(db_path)
    out = [(key.decode(), db.datum(key)) for key in db.keys()]
    db.close()
    return out


def objects(anno_datum):
    """(label, instance, difficult, xmin, ymin, xmax, ymax) per object, groups in order."""
    return [(g.group_label, a.instance_id, a.bbox.difficult, a.bbox.xmin, a.bbox.ymin, a.bbox.xmax,
             a.bbox.ymax) for g in anno_datum.annotation_group for a in g.annotation]


def norm(x, size):
    """The stored float32 coordinate / size, as the converter computes it."""
    return float(f32(x) / f32(size))


def detection(label_type, label_map, **changes):
    return ConvertOptions(anno_type="detection", label_type=label_type, label_map_file=str(label_map),
                          encode_type="jpg", encoded=True, check_label=True, **changes)


def test_label_maps_of_visdrone_and_aitod():
    assert labels_of(VISDRONE_MAP) == {
        "none_of_the_above": 0, "pedestrian": 1, "people": 2, "bicycle": 3, "car": 4, "van": 5,
        "truck": 6, "tricycle": 7, "awning-tricycle": 8, "bus": 9, "motor": 10}
    assert labels_of(AITOD_MAP) == {
        "none_of_the_above": 0, "airplane": 1, "bridge": 2, "storage-tank": 3, "ship": 4,
        "swimming-pool": 5, "vehicle": 6, "person": 7, "wind-mill": 8}


# ---------------------------------------------------------------------------------------------
# VisDrone-DET text

@pytest.fixture
def visdrone(tmp_path):
    """A VisDrone-DET split folder: an image with cars, a pedestrian, an ignored region, an
    'others' box and a score-0 van; a non-ASCII file name; an image with an empty annotation."""
    root = tmp_path / "VisDrone"
    split = root / "VisDrone2019-DET-train"
    write_image(split / "images" / "0000001_00000_d_0000001.jpg", 60, 80, 1)
    (split / "annotations").mkdir()
    (split / "annotations" / "0000001_00000_d_0000001.txt").write_text(
        "10,20,30,15,1,4,0,0\n"          # car
        "0,0,5,8,1,1,0,1\n"              # pedestrian at the corner
        "40,5,20,20,0,0,0,0\n"           # ignored region: dropped
        "2,30,10,10,1,11,0,0\n"          # others: dropped (not in the label map)
        "50,40,30,20,1,4,1,2,\n"         # car touching the right/bottom edges, trailing comma
        "60,1,8,6,0,5,0,0\n")            # van with score 0: difficult
    write_image(split / "images" / "ñandú_曲.jpg", 40, 50, 2)
    (split / "annotations" / "ñandú_曲.txt").write_text("5,6,7,8,1,10,0,0\n")
    write_image(split / "images" / "empty.jpg", 30, 30, 3)
    (split / "annotations" / "empty.txt").write_text("")
    return root


def test_visdrone_records_field_by_field(visdrone, tmp_path):
    report = lists.create_lists(visdrone, tmp_path / "lists", "folders", ["VisDrone2019-DET-train"], [])
    assert report.lists["trainval"][1] == 3 and "test" not in report.lists
    order = [line.split()[0] for line in (tmp_path / "lists" / "trainval.txt").read_text().splitlines()]
    build = build_annoset(visdrone, tmp_path / "lists" / "trainval.txt", tmp_path / "db",
                          detection("visdrone", VISDRONE_MAP))
    assert build.written == 3 and build.objects == 5
    assert build.dropped == {"VisDrone ignored-regions (category 0) dropped": 1,
                             "VisDrone others (category 11) dropped": 1}
    assert "1 VisDrone others (category 11) dropped" in build.summary()
    got = dict(zip([Path(p).name for p in order], [a for _, a in records(tmp_path / "db")]))
    first = got["0000001_00000_d_0000001.jpg"]
    assert (first.datum.height, first.datum.width, first.datum.encoded) == (60, 80, True)
    assert first.type == caffe_pb2.AnnotatedDatum.BBOX
    assert objects(first) == [
        (4, 0, False, norm(10, 80), norm(20, 60), norm(40, 80), norm(35, 60)),
        (4, 1, False, norm(50, 80), norm(40, 60), norm(80, 80), norm(60, 60)),
        (1, 0, False, 0.0, 0.0, norm(5, 80), norm(8, 60)),
        (5, 0, True, norm(60, 80), norm(1, 60), norm(68, 80), norm(7, 60))]
    assert objects(got["ñandú_曲.jpg"]) == [(10, 0, False, norm(5, 50), norm(6, 40), norm(12, 50), norm(14, 40))]
    assert got["empty.jpg"].type == caffe_pb2.AnnotatedDatum.BBOX and not len(got["empty.jpg"].annotation_group)
    keys = [key for key, _ in records(tmp_path / "db")]
    assert [key.split("_", 1)[1] for key in keys] == order


def test_visdrone_others_kept_when_the_label_map_names_them(visdrone, tmp_path):
    lm = tmp_path / "lm.prototxt"
    lm.write_text(VISDRONE_MAP.read_text() + 'item { name: "others" label: 11 display_name: "others" }\n')
    split = visdrone / "VisDrone2019-DET-train"
    (tmp_path / "l.txt").write_text(f"{split.name}/images/0000001_00000_d_0000001.jpg "
                                    f"{split.name}/annotations/0000001_00000_d_0000001.txt\n")
    report = build_annoset(visdrone, tmp_path / "l.txt", tmp_path / "db", detection("visdrone", lm))
    assert report.objects == 5 and list(report.dropped.values()) == [1]
    [(_, anno_datum)] = records(tmp_path / "db")
    assert [g.group_label for g in anno_datum.annotation_group] == [4, 1, 11, 5]


@pytest.mark.parametrize("line, message", [
    ("70,10,20,5,1,4,0,0", "outside the 80x60 image"),
    ("10,10,0,5,1,4,0,0", "empty or inverted"),
    ("10,10,5,5,1,12,0,0", "unknown VisDrone category 12"),
    ("10,10,5.5,5,1,4,0,0", "integer fields"),
    ("10,10,5,5", "integer fields"),
])
def test_visdrone_bad_entries_are_reported_per_entry(visdrone, tmp_path, line, message):
    split = visdrone / "VisDrone2019-DET-train"
    (split / "annotations" / "0000001_00000_d_0000001.txt").write_text(line + "\n")
    (tmp_path / "l.txt").write_text(
        f"{split.name}/images/empty.jpg {split.name}/annotations/empty.txt\n"
        f"{split.name}/images/0000001_00000_d_0000001.jpg {split.name}/annotations/0000001_00000_d_0000001.txt\n")
    with pytest.raises(AnnosetError, match=message) as err:
        build_annoset(visdrone, tmp_path / "l.txt", tmp_path / "db", detection("visdrone", VISDRONE_MAP))
    assert "entry 2" in str(err.value) and "0000001_00000_d_0000001.txt: line 1" in str(err.value)
    report = build_annoset(visdrone, tmp_path / "l.txt", tmp_path / "db",
                           detection("visdrone", VISDRONE_MAP, skip_bad=True))
    assert report.written == 1 and len(report.skipped) == 1 and message.split()[0] in report.skipped[0]


def test_visdrone_lmdb_through_the_annotated_data_layer(visdrone, tmp_path):
    split = visdrone / "VisDrone2019-DET-train"
    (tmp_path / "l.txt").write_text(f"{split.name}/images/0000001_00000_d_0000001.jpg "
                                    f"{split.name}/annotations/0000001_00000_d_0000001.txt\n")
    build_annoset(visdrone, tmp_path / "l.txt", tmp_path / "db", detection("visdrone", VISDRONE_MAP))
    lp = text_format.Parse(
        f'name: "data" type: "AnnotatedData" top: "data" top: "label" data_param {{ source: '
        f'"{tmp_path / "db"}" batch_size: 1 backend: LMDB }} transform_param {{ mean_value: 104 '
        'mean_value: 117 mean_value: 123 resize_param { prob: 1 resize_mode: WARP height: 32 '
        'width: 32 interp_mode: LINEAR } } annotated_data_param { batch_sampler { } '
        f'label_map_file: "{VISDRONE_MAP}" }}', caffe_pb2.LayerParameter())
    layer = registry.get("AnnotatedData")(lp, [], phase=caffe_pb2.TEST)
    layer.configure_loader(num_workers=0)
    data, label = layer.forward()
    assert tuple(data.shape) == (1, 3, 32, 32)
    rows = label[0, 0].numpy()
    expected = np.array([
        [0, 4, 0, 10 / 80, 20 / 60, 40 / 80, 35 / 60, 0],
        [0, 4, 1, 50 / 80, 40 / 60, 80 / 80, 60 / 60, 0],
        [0, 1, 0, 0, 0, 5 / 80, 8 / 60, 0],
        [0, 5, 0, 60 / 80, 1 / 60, 68 / 80, 7 / 60, 1]], f32)
    assert rows.shape == (4, 8) and np.allclose(rows, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# COCO instances json (AI-TOD)

@pytest.fixture
def aitod(tmp_path):
    """An AI-TOD-like tree: images/train with three images (one non-ASCII name, one without
    annotations), annotations/instances_train.json with a crowd box and float boxes."""
    root = tmp_path / "AI-TOD"
    write_image(root / "images" / "train" / "P0001__1024__0___0.png", 50, 100, 1)
    write_image(root / "images" / "train" / "naïve_港.png", 40, 40, 2)
    write_image(root / "images" / "train" / "no_objects.png", 20, 30, 3)
    doc = {
        "images": [{"id": 7, "file_name": "P0001__1024__0___0.png", "height": 50, "width": 100},
                   {"id": 9, "file_name": "naïve_港.png", "height": 40, "width": 40},
                   {"id": 11, "file_name": "no_objects.png", "height": 20, "width": 30}],
        "categories": [{"id": 1, "name": "airplane"}, {"id": 3, "name": "storage-tank"},
                       {"id": 6, "name": "vehicle"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 6, "bbox": [10.5, 20.25, 4.5, 3.0], "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [50, 10, 30, 30], "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 6, "bbox": [90, 45, 10, 5]}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(doc, ensure_ascii=False))
    return root


def test_coco_instances_records_field_by_field(aitod, tmp_path):
    report = lists.create_lists(aitod, tmp_path / "lists", "coco", [],
                                ["images/train:annotations/instances_train.json"])
    assert (tmp_path / "lists" / "test.txt").read_text() == (
        "images/train/P0001__1024__0___0.png annotations/instances_train.json\n"
        "images/train/naïve_港.png annotations/instances_train.json\n"
        "images/train/no_objects.png annotations/instances_train.json\n")
    assert (tmp_path / "lists" / "test_name_size.txt").read_text() == \
        "P0001__1024__0___0 50 100\nnaïve_港 40 40\nno_objects 20 30\n"
    assert report.lists["test"][1] == 3
    build_annoset(aitod, tmp_path / "lists" / "test.txt", tmp_path / "db", detection("coco", AITOD_MAP))
    (k0, a0), (k1, a1), (k2, a2) = records(tmp_path / "db")
    assert (k0, k1, k2) == ("00000000_images/train/P0001__1024__0___0.png",
                            "00000001_images/train/naïve_港.png", "00000002_images/train/no_objects.png")
    # PNG files re-encoded as jpg (--encode-type jpg)
    assert a0.datum.data[:2] == b"\xff\xd8" and (a0.datum.height, a0.datum.width) == (50, 100)
    assert objects(a0) == [
        (6, 0, False, norm(10.5, 100), norm(20.25, 50), float((f32(10.5) + f32(4.5)) / f32(100)),
         float((f32(20.25) + f32(3)) / f32(50))),
        (6, 1, False, norm(90, 100), norm(45, 50), 1.0, 1.0),
        (3, 0, True, norm(50, 100), norm(10, 50), norm(80, 100), norm(40, 50))]      # crowd
    assert objects(a1) == [(1, 0, False, 0.0, 0.0, 1.0, 1.0)]
    assert a2.type == caffe_pb2.AnnotatedDatum.BBOX and not len(a2.annotation_group)


def test_coco_bad_entries(aitod, tmp_path):
    path = aitod / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    (tmp_path / "l.txt").write_text("images/train/no_objects.png annotations/instances_train.json\n"
                                    "images/train/P0001__1024__0___0.png annotations/instances_train.json\n")
    cases = [({"category_id": 2}, "category_id 2 is not among the file's categories"),
             ({"bbox": [95, 0, 10, 5]}, "outside the 100x50 image"),
             ({"bbox": [5, 5, 0, 5]}, "empty or inverted"),
             ({"bbox": [5, 5, 5]}, "must be \\[x, y, width, height\\]")]
    for change, message in cases:
        bad = json.loads(json.dumps(doc))
        bad["annotations"][0].update(change)
        path.write_text(json.dumps(bad))
        with pytest.raises(AnnosetError, match=message) as err:
            build_annoset(aitod, tmp_path / "l.txt", tmp_path / "db", detection("coco", AITOD_MAP), redo=True)
        assert "entry 2" in str(err.value) and "annotation id 1" in str(err.value)
        report = build_annoset(aitod, tmp_path / "l.txt", tmp_path / "db",
                               detection("coco", AITOD_MAP, skip_bad=True), redo=True)
        assert report.written == 1 and len(report.skipped) == 1
    bad = json.loads(json.dumps(doc))
    bad["categories"][2]["name"] = "tractor"
    path.write_text(json.dumps(bad))
    with pytest.raises(AnnosetError, match="unknown class name 'tractor'"):
        build_annoset(aitod, tmp_path / "l.txt", tmp_path / "db2", detection("coco", AITOD_MAP))
    (tmp_path / "l.txt").write_text("images/train/elsewhere.png annotations/instances_train.json\n")
    write_image(aitod / "images" / "train" / "elsewhere.png", 10, 10)
    with pytest.raises(AnnosetError, match="no image with file_name 'elsewhere.png'"):
        build_annoset(aitod, tmp_path / "l.txt", tmp_path / "db3", detection("coco", AITOD_MAP))


# ---------------------------------------------------------------------------------------------
# the fork's per-image json (--label-type json), with a non-ASCII name and a crowd box

def test_fork_per_image_json(tmp_path):
    write_image(tmp_path / "imgs" / "café.jpg", 40, 60)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "café.json").write_text(json.dumps({
        "image": {"id": 1, "file_name": "café.jpg", "height": 40, "width": 60},
        "annotation": [{"id": 5, "category_id": 18, "bbox": [1, 2, 10, 20], "iscrowd": 1},
                       {"id": 6, "category_id": 1, "bbox": [30.5, 0, 29.5, 40], "iscrowd": 0}]},
        ensure_ascii=False), encoding="utf-8")
    lm = tmp_path / "coco.prototxt"
    lm.write_text('item { name: "none_of_the_above" label: 0 } item { name: "1" label: 1 '
                  'display_name: "person" } item { name: "18" label: 17 display_name: "dog" }')
    (tmp_path / "l.txt").write_text("imgs/café.jpg labels/café.json\n", encoding="utf-8")
    build_annoset(tmp_path, tmp_path / "l.txt", tmp_path / "db", detection("json", lm))
    [(key, anno_datum)] = records(tmp_path / "db")
    assert key == "00000000_imgs/café.jpg"
    assert objects(anno_datum) == [
        (17, 0, True, norm(1, 60), norm(2, 40), norm(11, 60), norm(22, 40)),
        (1, 0, False, norm(30.5, 60), 0.0, 1.0, 1.0)]


# ---------------------------------------------------------------------------------------------
# create-list layouts

def voc_tree(root):
    for year, splits in (("VOC2007", {"trainval": ["000005", "000007"], "test": ["000001"]}),
                         ("VOC2012", {"trainval": ["2008_000002"]})):
        (root / year / "ImageSets" / "Main").mkdir(parents=True)
        for split, ids in splits.items():
            (root / year / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
            for i in ids:
                write_image(root / year / "JPEGImages" / f"{i}.jpg", 30 + len(i), 40)
    return root


def test_voc_layout_is_create_list_sh(tmp_path):
    root = voc_tree(tmp_path / "VOCdevkit")
    report = lists.create_lists(root, tmp_path / "out", "voc", seed=3)
    trainval = (tmp_path / "out" / "trainval.txt").read_text().splitlines()
    assert sorted(trainval) == sorted([
        "VOC2007/JPEGImages/000005.jpg VOC2007/Annotations/000005.xml",
        "VOC2007/JPEGImages/000007.jpg VOC2007/Annotations/000007.xml",
        "VOC2012/JPEGImages/2008_000002.jpg VOC2012/Annotations/2008_000002.xml"])
    assert (tmp_path / "out" / "test.txt").read_text() == \
        "VOC2007/JPEGImages/000001.jpg VOC2007/Annotations/000001.xml\n"
    assert (tmp_path / "out" / "test_name_size.txt").read_text() == "000001 36 40\n"
    assert report.lists["trainval"][1] == 3
    again = lists.create_lists(root, tmp_path / "again", "voc", seed=3)
    assert (tmp_path / "again" / "trainval.txt").read_text() == "\n".join(trainval) + "\n"
    orders = {tuple(lists.layout_entries(root, "voc", ["VOC2007", "VOC2012"], "trainval"))}
    for seed in range(6):
        lists.create_lists(root, tmp_path / "s", "voc", seed=seed, name_size=False)
        orders.add(tuple(tuple(line.split()) for line in (tmp_path / "s" / "trainval.txt").read_text().splitlines()))
    assert len(orders) > 1                                   # shuffled, not list order
    assert again.summary().count("lines") == 3


def test_folders_layout_pairs_by_stem(tmp_path):
    root = tmp_path / "drone"
    for split in ("train", "val"):
        write_image(root / split / "Images" / "b.jpg", 10, 10)
        write_image(root / split / "Images" / "a.png", 12, 10)
        (root / split / "Labels").mkdir(parents=True)
        (root / split / "Labels" / "a.xml").write_text("<annotation/>")
    (root / "train" / "Images" / "notes.md").write_text("not an image")
    lists.create_lists(root, tmp_path / "out", "folders", ["train"], ["val"])
    assert (tmp_path / "out" / "test.txt").read_text() == (
        "val/Images/a.png val/Labels/a.xml\nval/Images/b.jpg val/Labels/b.xml\n")
    assert (tmp_path / "out" / "test_name_size.txt").read_text() == "a 12 10\nb 10 10\n"
    assert len((tmp_path / "out" / "trainval.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("layout, trainval, message", [
    ("folders", None, "needs the trainval part"),
    ("folders", ["nothere"], "not a folder"),
    ("coco", ["images"], "is not IMAGES:JSON"),
    ("voc", ["VOC2042"], "cannot read the trainval ids"),
])
def test_create_list_refusals(tmp_path, layout, trainval, message):
    root = voc_tree(tmp_path / "root")
    with pytest.raises(AnnosetError, match=message):
        lists.create_lists(root, tmp_path / "out", layout, trainval, [])
    assert not (tmp_path / "out").exists()


def test_white_space_in_a_file_name_is_refused(tmp_path):
    root = tmp_path / "r"
    write_image(root / "s" / "images" / "a b.jpg", 10, 10)
    (root / "s" / "annotations").mkdir()
    with pytest.raises(AnnosetError, match="white space"):
        lists.create_lists(root, tmp_path / "out", "folders", ["s"], [])


def test_two_commands_from_visdrone_folders_to_lmdbs(visdrone, tmp_path, capsys):
    shutil.copytree(visdrone / "VisDrone2019-DET-train", visdrone / "VisDrone2019-DET-val")
    out = tmp_path / "data" / "VisDrone"
    assert cli.main(["create-list", str(visdrone), str(out), "--layout", "folders",
                     "--trainval", "VisDrone2019-DET-train", "--test", "VisDrone2019-DET-val"]) == 0
    assert "trainval.txt: 3 lines" in capsys.readouterr().out
    for subset in ("trainval", "test"):
        assert cli.main(["create-data", "--anno-type", "detection", "--label-type", "visdrone",
                         "--label-map-file", str(VISDRONE_MAP), "--encode-type", "jpg", "--encoded",
                         str(visdrone), str(out / f"{subset}.txt"), str(tmp_path / f"{subset}_lmdb")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("3 records, 5 objects, 1 VisDrone ignored-regions (category 0) dropped") == 2
    assert len(records(tmp_path / "test_lmdb")) == 3
    assert (out / "test_name_size.txt").read_text().splitlines()[0] == "0000001_00000_d_0000001 60 80"
    assert cli.main(["create-list", str(visdrone), str(out), "--layout", "coco", "--trainval", "--test", "x"]) == 2
    assert "is not IMAGES:JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# zoo models on these data sets

@pytest.mark.parametrize("name, label_map, classes, test_images, folder", [
    ("ssd300_visdrone", "data/labelmap_visdrone.prototxt", 11, 548, "VisDrone"),
    ("deeper_ssd500_visdrone", "data/labelmap_visdrone.prototxt", 11, 548, "VisDrone"),
    ("deeper_ssd500_aitod", "data/labelmap_aitod.prototxt", 9, 14018, "AI-TOD"),
])
def test_zoo_models_read_what_create_list_and_create_data_write(name, label_map, classes, test_images, folder):
    from deeper_ssd.builder import zoo
    model = zoo.get(name)
    nets = model.nets()
    train = {layer.name: layer for layer in nets["train"].layer}
    test = {layer.name: layer for layer in nets["test"].layer}
    assert train["data"].annotated_data_param.label_map_file == label_map
    assert len(io.read_labelmap(REPO / label_map).item) == classes
    assert train["data"].data_param.source == f"examples/{folder}/{folder}_trainval_lmdb"
    assert test["data"].data_param.source == f"examples/{folder}/{folder}_test_lmdb"
    assert train["data"].data_param.batch_size == 8                       # the paper's batch
    loss = train["mbox_loss"].multibox_loss_param
    assert loss.num_classes == classes and not loss.use_difficult_gt      # ignored/crowd: not matched
    evaluate = test["detection_eval"].detection_evaluate_param
    assert not evaluate.evaluate_difficult_gt                             # ... nor counted
    assert evaluate.name_size_file == f"data/{folder}/test_name_size.txt"  # create-list's file
    solver = zoo.solver_for(model)
    assert (list(solver.stepvalue), solver.max_iter, solver.base_lr) == ([60000, 90000, 120000], 150000, pytest.approx(0.001))
    assert solver.test_iter[0] == -(-test_images // 8)
    assert len(model.plan().layers) == (6 if name.startswith("ssd300") else 9)
    committed = io.read_net(REPO / "prototxt" / f"{name}_srtod" / "train.prototxt")
    types = {layer.type for layer in committed.layer}
    assert {"DGFE", "DifferenceMap", "MSELoss"} <= types                  # --head srtod, committed
    srtod_loss = [l for l in committed.layer if l.type == "MultiBoxLoss"][0].multibox_loss_param
    assert srtod_loss.num_classes == classes and not srtod_loss.use_difficult_gt


def test_voc_folder_pair_with_non_ascii_names_and_an_image_without_objects(tmp_path):
    root = tmp_path / "drone"
    write_image(root / "val" / "Images" / "über_δ.jpg", 40, 50)
    write_image(root / "val" / "Images" / "nothing.jpg", 20, 20)
    (root / "val" / "Labels").mkdir(parents=True)
    (root / "val" / "Labels" / "über_δ.xml").write_text(
        "<annotation><size><width>50</width><height>40</height></size><object><name>drone</name>"
        "<difficult>1</difficult><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>13</xmax><ymax>24</ymax>"
        "</bndbox></object></annotation>", encoding="utf-8")
    (root / "val" / "Labels" / "nothing.xml").write_text(
        "<annotation><size><width>20</width><height>20</height></size></annotation>")
    lists.create_lists(root, tmp_path / "out", "folders", [], ["val"])
    report = build_annoset(root, tmp_path / "out" / "test.txt", tmp_path / "db",
                           detection("xml", REPO / "data" / "labelmap_drone.prototxt"))
    assert report.written == 2 and report.objects == 1 and not report.warnings
    (k0, a0), (k1, a1) = records(tmp_path / "db")
    assert (k0, k1) == ("00000000_val/Images/nothing.jpg", "00000001_val/Images/über_δ.jpg")
    assert a0.type == caffe_pb2.AnnotatedDatum.BBOX and not len(a0.annotation_group)
    assert objects(a1) == [(1, 0, True, norm(3, 50), norm(4, 40), norm(13, 50), norm(24, 40))]
    assert (tmp_path / "out" / "test_name_size.txt").read_text(encoding="utf-8") == "nothing 20 20\nüber_δ 40 50\n"


# ---------------------------------------------------------------------------------------------
# the annotations as real Caffe's readers build them: a COCO instances entry equals the fork's
# per-image json of the same boxes (ReadJSONToAnnotatedDatum), VisDrone text its plain txt
# (ReadTxtToAnnotatedDatum; no difficult flag there, so no score-0 box)

def test_annotations_match_the_forks_json_and_txt_readers(oracle, aitod, tmp_path):
    import hashlib
    from test_annoset import COMPILE, CONVERTER
    doc = json.loads((aitod / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    files = {"labelmap_aitod.prototxt": AITOD_MAP.read_text(), "labelmap_visdrone.prototxt": VISDRONE_MAP.read_text()}
    coco_list, fork_list = [], []
    for image in doc["images"]:
        stem = Path(image["file_name"]).stem
        per_image = {"image": {"height": image["height"], "width": image["width"]},
                     "annotation": [{"category_id": names[a["category_id"]], "bbox": a["bbox"],
                                     "iscrowd": a.get("iscrowd", 0)}
                                    for a in doc["annotations"] if a["image_id"] == image["id"]]}
        files[f"root/json/{stem}.json"] = json.dumps(per_image)
        files[f"root/images/train/{image['file_name']}"] = aitod / "images" / "train" / image["file_name"]
        coco_list.append(f"images/train/{image['file_name']} annotations/instances_train.json")
        fork_list.append(f"images/train/{image['file_name']} json/{stem}.json")
    (tmp_path / "coco.txt").write_text("\n".join(coco_list) + "\n")
    files["root/coco_fork.txt"] = "\n".join(fork_list) + "\n"
    write_image(tmp_path / "vd" / "v.jpg", 60, 80)
    (tmp_path / "vd" / "v.txt").write_text("10,20,30,15,1,4,0,0\n0,0,5,8,1,1,0,1\n40,5,20,20,0,0,0,0\n"
                                           "2,30,10,10,1,11,0,0\n50,40,30,20,1,4,1,2\n")
    (tmp_path / "vd" / "list.txt").write_text("v.jpg v.txt\n")
    files["root/v.jpg"] = tmp_path / "vd" / "v.jpg"
    files["root/v_fork.txt"] = "4 10 20 40 35\n1 0 0 5 8\n4 50 40 80 60\n"
    files["root/visdrone_fork.txt"] = "v.jpg v_fork.txt\n"
    files["convert.cpp"] = CONVERTER
    binary = f"/tmp/deeper_ssd_convert_{hashlib.sha1(CONVERTER.encode()).hexdigest()[:12]}"
    caffe = oracle.run("\n".join([
        f"if not os.path.exists({binary!r}):",
        f"    assert os.system({COMPILE.format(binary=binary)!r}) == 0, 'compiling the converter failed'",
        "os.makedirs('coco'); os.makedirs('vd')",
        f"assert os.system('{binary} root/ root/coco_fork.txt labelmap_aitod.prototxt jpg 1 0 0 coco json') == 0",
        f"assert os.system('{binary} root/ root/visdrone_fork.txt labelmap_visdrone.prototxt jpg 1 0 0 vd txt') == 0",
        "for i in range(3): out['coco_%d' % i] = np.frombuffer(open('coco/rec_%d.bin' % i, 'rb').read(), np.uint8)",
        "out['vd_0'] = np.frombuffer(open('vd/rec_0.bin', 'rb').read(), np.uint8)"]), files)
    build_annoset(aitod, tmp_path / "coco.txt", tmp_path / "coco_db", detection("coco", AITOD_MAP))
    build_annoset(tmp_path / "vd", tmp_path / "vd" / "list.txt", tmp_path / "vd_db", detection("visdrone", VISDRONE_MAP))
    pairs = [(ours, f"coco_{i}") for i, (_, ours) in enumerate(records(tmp_path / "coco_db"))]
    pairs += [(records(tmp_path / "vd_db")[0][1], "vd_0")]
    assert len(pairs) == 4
    for ours, key in pairs:
        theirs = caffe_pb2.AnnotatedDatum.FromString(caffe[key].tobytes())
        assert theirs.type == ours.type == caffe_pb2.AnnotatedDatum.BBOX
        assert [g.SerializeToString() for g in ours.annotation_group] == \
            [g.SerializeToString() for g in theirs.annotation_group], key
    crowd = caffe_pb2.AnnotatedDatum.FromString(caffe["coco_0"].tobytes())
    assert [a.bbox.difficult for g in crowd.annotation_group for a in g.annotation] == [False, False, True]


def test_create_annoset_tool_reads_visdrone(visdrone, tmp_path):
    import subprocess
    import sys
    split = "VisDrone2019-DET-train"
    (tmp_path / "l.txt").write_text(f"{split}/images/0000001_00000_d_0000001.jpg "
                                    f"{split}/annotations/0000001_00000_d_0000001.txt\n")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "create_annoset.py"), "--anno-type=detection",
                           "--label-type=visdrone", f"--label-map-file={VISDRONE_MAP}", "--encode-type=jpg",
                           "--encoded", str(visdrone), str(tmp_path / "l.txt"), str(tmp_path / "db")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 records, 4 objects, 1 VisDrone ignored-regions (category 0) dropped, " \
           "1 VisDrone others (category 11) dropped" in proc.stdout


def test_a_shuffled_list_over_two_jsons_parses_each_once(aitod, tmp_path, monkeypatch):
    from deeper_ssd.data import annoset
    write_image(aitod / "images" / "val" / "v1.png", 30, 30, 9)
    (aitod / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "v1.png", "height": 30, "width": 30}],
        "categories": [{"id": 4, "name": "ship"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4]}]}))
    lists.create_lists(aitod, tmp_path / "l", "coco", ["images/train:annotations/instances_train.json",
                                                       "images/val:annotations/instances_val.json"], [], seed=6)
    order = [line.split()[1] for line in (tmp_path / "l" / "trainval.txt").read_text().splitlines()]
    assert order[0] == order[2] != order[1]                      # train, val, train: alternating
    parsed = []
    real_loads = annoset.json.loads
    monkeypatch.setattr(annoset.json, "loads", lambda text: parsed.append(1) or real_loads(text))
    build_annoset(aitod, tmp_path / "l" / "trainval.txt", tmp_path / "db", detection("coco", AITOD_MAP))
    assert len(parsed) == 2
    got = {key.split("/")[-1]: objects(a) for key, a in records(tmp_path / "db")}
    assert got["v1.png"] == [(4, 0, False, norm(1, 30), norm(2, 30), norm(4, 30), norm(6, 30))]
    assert len(got["P0001__1024__0___0.png"]) == 3 and got["no_objects.png"] == []


def test_voc_recipe_from_the_command_line(tmp_path, capsys):
    root = voc_tree(tmp_path / "VOCdevkit")
    for year, ids in (("VOC2007", ["000005", "000007", "000001"]), ("VOC2012", ["2008_000002"])):
        (root / year / "Annotations").mkdir()
        for i in ids:
            (root / year / "Annotations" / f"{i}.xml").write_text(
                f"<annotation><size><width>40</width><height>{30 + len(i)}</height></size><object>"
                "<name>dog</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax><ymax>30</ymax>"
                "</bndbox></object></annotation>")
    out = tmp_path / "data" / "VOC0712"
    assert cli.main(["create-list", str(root), str(out), "--layout", "voc"]) == 0
    for subset, count in (("trainval", 3), ("test", 1)):
        assert cli.main(["create-data", "--anno-type", "detection", "--label-map-file",
                         str(REPO / "data" / "labelmap_voc.prototxt"), "--encode-type", "jpg", "--encoded",
                         str(root), str(out / f"{subset}.txt"), str(tmp_path / f"VOC0712_{subset}_lmdb")]) == 0
        assert len(records(tmp_path / f"VOC0712_{subset}_lmdb")) == count
    assert (out / "test_name_size.txt").read_text() == "000001 36 40\n"
    assert "3 records, 3 objects" in capsys.readouterr().out


def test_zoominnet_variant_of_a_visdrone_model(tmp_path, capsys):
    assert cli.main(["generate", "ssd300_visdrone", "--head", "zoomin", "--out", str(tmp_path)]) == 0
    student = io.read_net(tmp_path / "ssd300_visdrone_zoomin" / "train.prototxt")
    teacher = io.read_net(tmp_path / "ssd300_visdrone_zoomin_teacher" / "train.prototxt")
    for net in (student, teacher):
        data = [layer for layer in net.layer if layer.type == "AnnotatedData"][0]
        assert data.annotated_data_param.label_map_file == "data/labelmap_visdrone.prototxt"
        assert data.data_param.source == "examples/VisDrone/VisDrone_trainval_lmdb"
        loss = [layer for layer in net.layer if layer.type == "MultiBoxLoss"][0].multibox_loss_param
        assert loss.num_classes == 11 and not loss.use_difficult_gt
    assert any(layer.type == "PositionAwareL2Loss" for layer in student.layer)
