"""Annotated LMDB creation and reading (deeper_ssd.data.annoset, create-data, data-info)."""
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from deeper_ssd import cli
from deeper_ssd.data import annoset
from deeper_ssd.data.annoset import AnnosetError, AnnotatedDB, ConvertOptions, build_annoset
from deeper_ssd.proto import caffe_pb2

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = FIXTURES.parent.parent
LABELMAP = FIXTURES / "labelmap_voc.prototxt"


def voc_boxes(xml_path):
    """(name, difficult, xmin, ymin, xmax, ymax) of each object of a VOC file, in order."""
    root = ET.parse(xml_path).getroot()
    return [(o.findtext("name"), o.findtext("difficult") == "1",
             *(int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")))
            for o in root.findall("object")]


@pytest.fixture
def root(tmp_path):
    """A dataset root with the real fixture photo and its XML, and a one-line list."""
    shutil.copy(FIXTURES / "voc_dining.jpg", tmp_path / "img.jpg")
    shutil.copy(FIXTURES / "voc_dining.xml", tmp_path / "img.xml")
    (tmp_path / "list.txt").write_text("img.jpg img.xml\n")
    return tmp_path


def detection(**changes):
    options = dict(anno_type="detection", label_map_file=str(LABELMAP), encode_type="jpg",
                   encoded=True, check_label=True)
    options.update(changes)
    return ConvertOptions(**options)


def records(db_path):
    db = AnnotatedDB(db_path)
    out = [(key.decode(), db.datum(key)) for key in db.keys()]
    db.close()
    return out


def test_round_trip_voc_xml_matches_fork_convention(root):
    build_annoset(root, root / "list.txt", root / "db", detection())
    [(key, anno_datum)] = records(root / "db")
    assert key == "00000000_img.jpg"
    datum = anno_datum.datum
    # --encode-type jpg on a .jpg in colour without resizing keeps the original file bytes
    assert datum.data == (root / "img.jpg").read_bytes()
    assert (datum.channels, datum.height, datum.width, datum.label, datum.encoded) == (3, 375, 500, -1, True)
    assert anno_datum.HasField("type") and anno_datum.type == caffe_pb2.AnnotatedDatum.BBOX
    labels = {item.name: item.label for item in annoset.io.read_text(LABELMAP, caffe_pb2.LabelMap).item}
    expected = voc_boxes(root / "img.xml")
    assert len(expected) == 19
    # groups in order of first appearance, instance ids 0, 1, 2 ... within a group
    order = list(dict.fromkeys(labels[name] for name, *_ in expected))
    assert [g.group_label for g in anno_datum.annotation_group] == order
    got = [(g.group_label, a.instance_id, a.bbox) for g in anno_datum.annotation_group for a in g.annotation]
    want = sorted(((labels[n], d, box) for n, d, *box in expected), key=lambda t: order.index(t[0]))
    for group_label in order:
        ids = [i for label, i, _ in got if label == group_label]
        assert ids == list(range(len(ids)))
    assert len(got) == len(want), (len(got), len(want))
    for (label, _, bbox), (want_label, difficult, (x0, y0, x1, y1)) in zip(got, want):
        assert label == want_label and bbox.difficult == difficult
        # normalised WITHOUT the -1: float32(coordinate) / float32(size)
        assert bbox.xmin == np.float32(x0) / np.float32(500)
        assert bbox.ymin == np.float32(y0) / np.float32(375)
        assert bbox.xmax == np.float32(x1) / np.float32(500)
        assert bbox.ymax == np.float32(y1) / np.float32(375)
        assert bbox.xmin != np.float32(x0 - 1) / np.float32(500)


def test_difficult_applies_to_the_following_bndbox_only(tmp_path):
    shutil.copy(FIXTURES / "voc_dining.jpg", tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text(
        "<annotation><size><width>500</width><height>375</height></size>"
        "<object><name>person</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>"
        "<object><name>person</name>"
        "<bndbox><xmin>5</xmin><ymin>6</ymin><xmax>50</xmax><ymax>60</ymax></bndbox><difficult>1</difficult></object>"
        "<object><name>dog</name><bndbox><xmin>7</xmin><ymin>8</ymin><xmax>70</xmax><ymax>80</ymax></bndbox></object>"
        "</annotation>")
    (tmp_path / "list.txt").write_text("a.jpg a.xml\n")
    build_annoset(tmp_path, tmp_path / "list.txt", tmp_path / "db", detection())
    [(_, anno_datum)] = records(tmp_path / "db")
    person, dog = anno_datum.annotation_group
    assert [a.bbox.difficult for a in person.annotation] == [True, False]
    assert [a.instance_id for a in person.annotation] == [0, 1]
    assert dog.group_label == 12 and dog.annotation[0].instance_id == 0


def test_encodings_raw_and_resize(root):
    image = cv2.imread(str(root / "img.jpg"))
    build_annoset(root, root / "list.txt", root / "png", detection(encode_type="png"))
    [(_, png)] = records(root / "png")
    assert png.datum.data[:4] == b"\x89PNG"
    assert np.array_equal(cv2.imdecode(np.frombuffer(png.datum.data, np.uint8), -1), image)
    build_annoset(root, root / "list.txt", root / "raw", detection(encode_type="", encoded=False))
    [(_, raw)] = records(root / "raw")
    assert not raw.datum.encoded and raw.datum.HasField("encoded")
    assert raw.datum.data == image.transpose(2, 0, 1).tobytes()          # CHW order
    build_annoset(root, root / "list.txt", root / "small",
                  detection(resize_width=250, resize_height=200))
    [(_, small)] = records(root / "small")
    assert (small.datum.height, small.datum.width) == (200, 250)
    assert small.datum.data[:2] == b"\xff\xd8"                          # re-encoded, not the file
    # boxes stay normalised by the XML size
    assert small.annotation_group[0].annotation[0].bbox == png.annotation_group[0].annotation[0].bbox
    build_annoset(root, root / "list.txt", root / "gray", detection(gray=True))
    [(_, gray)] = records(root / "gray")
    assert gray.datum.channels == 1


def test_key_order_is_list_order_and_skipped_lines_consume_their_index(root):
    lines = ["img.jpg img.xml"] * 11 + ["missing.jpg img.xml", "img.jpg img.xml"]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    report = build_annoset(root, root / "list.txt", root / "db", detection(skip_bad=True))
    assert report.written == 12 and len(report.skipped) == 1
    assert "missing.jpg" in report.skipped[0] and "entry 12" in report.skipped[0]
    keys = [key for key, _ in records(root / "db")]
    assert keys == [f"{i:08d}_img.jpg" for i in range(11)] + ["00000012_img.jpg"]


def test_shuffle_is_seeded(root):
    (root / "list.txt").write_text("img.jpg img.xml\n" * 6)
    for name in ("a", "b"):
        build_annoset(root, root / "list.txt", root / name, detection(shuffle=True, seed=3))
    assert [k for k, _ in records(root / "a")] == [k for k, _ in records(root / "b")]


@pytest.mark.parametrize("xml_body, message", [
    ("<object><name>person</name><bndbox><xmin>0</xmin><ymin>2</ymin><xmax>501</xmax><ymax>9</ymax></bndbox></object>",
     "outside the 500x375 image"),
    ("<object><name>person</name><bndbox><xmin>40</xmin><ymin>2</ymin><xmax>40</xmax><ymax>9</ymax></bndbox></object>",
     "empty or inverted"),
    ("<object><name>zebra</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>",
     "unknown class name 'zebra'"),
    ("<object><name>person</name><bndbox><xmin>1.5</xmin><ymin>2</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>",
     "not an integer pixel coordinate"),
])
def test_bad_annotations_name_the_file(root, xml_body, message):
    (root / "img.xml").write_text(f"<annotation><size><width>500</width><height>375</height></size>"
                                  f"{xml_body}</annotation>")
    with pytest.raises(AnnosetError, match=message) as err:
        build_annoset(root, root / "list.txt", root / "db", detection())
    assert "img.xml" in str(err.value) and "entry 1" in str(err.value)
    assert not (root / "db").exists()
    assert not list(root.glob(".db.partial-*"))          # nothing half-written


def test_bad_images_and_lists(root):
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "list.txt").write_text("broken.jpg img.xml\n")
    with pytest.raises(AnnosetError, match="broken.jpg: image cannot be decoded"):
        build_annoset(root, root / "list.txt", root / "db", detection())
    (root / "list.txt").write_text("nothere.jpg img.xml\n")
    with pytest.raises(AnnosetError, match="nothere.jpg: image does not exist"):
        build_annoset(root, root / "list.txt", root / "db", detection())
    with pytest.raises(AnnosetError, match="no record could be written"):
        build_annoset(root, root / "list.txt", root / "db", detection(skip_bad=True))
    (root / "list.txt").write_text("\n")
    with pytest.raises(AnnosetError, match="list file is empty"):
        build_annoset(root, root / "list.txt", root / "db", detection())
    (root / "list.txt").write_text("img.jpg img.xml img.jpg\n")
    with pytest.raises(AnnosetError, match="exactly two"):
        build_annoset(root, root / "list.txt", root / "db", detection())
    assert not (root / "db").exists()


def test_existing_db_needs_redo_and_is_replaced_whole(root):
    build_annoset(root, root / "list.txt", root / "db", detection())
    with pytest.raises(AnnosetError, match="already exists"):
        build_annoset(root, root / "list.txt", root / "db", detection())
    (root / "list.txt").write_text("img.jpg img.xml\nimg.jpg img.xml\n")
    build_annoset(root, root / "list.txt", root / "db", detection(), redo=True)
    assert len(records(root / "db")) == 2
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_missing_annotation_file_gives_a_record_without_objects(root):
    (root / "list.txt").write_text("img.jpg nothere.xml\n")
    report = build_annoset(root, root / "list.txt", root / "db", detection())
    assert any("nothere.xml" in w for w in report.warnings)
    [(_, anno_datum)] = records(root / "db")
    assert anno_datum.type == caffe_pb2.AnnotatedDatum.BBOX and not len(anno_datum.annotation_group)


def test_label_map_duplicates_are_refused_without_check_label(tmp_path):
    """The fork takes the later item unless --check-label; its test-time layers then refuse the
    file, so it is refused here at once (docs/decisions.md)."""
    path = tmp_path / "lm.prototxt"
    path.write_text('item { name: "a" label: 1 } item { name: "a" label: 2 }')
    with pytest.raises(AnnosetError, match="duplicate name 'a'"):
        annoset.map_name_to_label(path)
    path.write_text('item { name: "a" label: 1 } item { name: "b" label: 1 }')
    with pytest.raises(AnnosetError, match="duplicate label 1"):
        annoset.map_name_to_label(path)


def test_coco_json_and_txt_label_types(root):
    (root / "img.json").write_text(json.dumps({
        "image": {"height": 375, "width": 500},
        "annotation": [{"category_id": 15, "bbox": [10.5, 20, 100, 50], "iscrowd": 1},
                       {"category_id": 15, "bbox": [0, 0, 10, 10], "iscrowd": 0}]}))
    lm = root / "coco.prototxt"
    lm.write_text('item { name: "none" label: 0 } item { name: "15" label: 1 }')
    (root / "list.txt").write_text("img.jpg img.json\n")
    build_annoset(root, root / "list.txt", root / "db", detection(label_type="json", label_map_file=str(lm)))
    [(_, anno_datum)] = records(root / "db")
    [group] = anno_datum.annotation_group
    first = group.annotation[0].bbox
    assert group.group_label == 1 and first.difficult and not group.annotation[1].bbox.difficult
    assert first.xmin == np.float32(10.5) / np.float32(500)
    assert first.xmax == (np.float32(10.5) + np.float32(100)) / np.float32(500)
    (root / "img.txt").write_text("3 10 20 110 70\n")
    (root / "list.txt").write_text("img.jpg img.txt\n")
    build_annoset(root, root / "list.txt", root / "db2", detection(label_type="txt"))
    [(_, anno_datum)] = records(root / "db2")
    assert anno_datum.annotation_group[0].group_label == 3


def test_classification_records(root):
    (root / "list.txt").write_text("img.jpg 7\n")
    build_annoset(root, root / "list.txt", root / "db", ConvertOptions(encode_type="jpg"))
    [(_, anno_datum)] = records(root / "db")
    assert anno_datum.datum.label == 7 and not anno_datum.HasField("type")
    (root / "list.txt").write_text("img.jpg seven\n")
    with pytest.raises(AnnosetError, match="not an integer"):
        build_annoset(root, root / "list.txt", root / "db2", ConvertOptions())


def test_name_size_file(root):
    annoset.write_name_size_file(root, root / "list.txt", root / "test_name_size.txt")
    assert (root / "test_name_size.txt").read_text() == "img 375 500\n"    # name HEIGHT WIDTH


def test_missing_or_corrupt_lmdb(tmp_path):
    with pytest.raises(AnnosetError, match=f"LMDB {tmp_path / 'nope'} does not exist"):
        AnnotatedDB(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(AnnosetError, match="is not an LMDB"):
        AnnotatedDB(tmp_path / "dir")
    with pytest.raises(AnnosetError, match="not an AnnotatedDatum|without a datum"):
        annoset.parse_record(b"\x08\x01garbage", "rec")


def test_create_data_cli_and_data_info(root, capsys):
    argv = ["--anno-type=detection", f"--label-map-file={LABELMAP}", "--min-dim=0", "--max-dim=0",
            "--resize-width=0", "--resize-height=0", "--check-label", "--encode-type=jpg", "--encoded",
            "--redo", str(root), str(root / "list.txt"), str(root / "out" / "db"), str(root / "examples"),
            "--name-size", str(root / "ns.txt")]
    assert cli.main(["create-data"] + argv) == 0
    assert (root / "examples" / "db").resolve() == (root / "out" / "db").resolve()
    assert (root / "ns.txt").read_text() == "img 375 500\n"
    assert cli.main(["data-info", str(root / "out" / "db"), "--list", "--dump", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 records" in out and "00000000_img.jpg" in out and "group_label: 5" in out
    assert cli.main(["data-info", str(root / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["create-data", "--backend", "leveldb", str(root), str(root / "list.txt"), str(root / "x")]) == 2


def test_create_annoset_tool_is_a_drop_in(root):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "create_annoset.py"), "--anno-type=detection",
                           f"--label-map-file={LABELMAP}", "--encode-type=jpg", "--encoded", str(root),
                           str(root / "list.txt"), str(root / "db")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 records, 19 objects" in proc.stdout


# ---------------------------------------------------------------------------------------------
# records written by real Caffe's converter code path (ReadRichImageToAnnotatedDatum of the
# oracle's libcaffe, compiled once into the oracle's /tmp) against ours

CONVERTER = (Path(__file__).resolve().parent / "oracle_src" / "convert_annoset_records.cpp").read_text()
COMPILE = ("g++ -O1 -std=c++11 -DCPU_ONLY -DUSE_OPENCV -include /opt/brocolli/opencv4_compat.h "
           "-I/opt/brocolli/.temp_release/src -I/opt/brocolli/include -I/usr/include/opencv4 "
           "-I/usr/include/hdf5/serial convert.cpp -o {binary} -L/opt/brocolli/.temp_release/lib "
           "-Wl,-rpath,/opt/brocolli/.temp_release/lib -lcaffe -lglog -lprotobuf -lboost_system "
           "-lopencv_core -lopencv_imgcodecs -lopencv_imgproc")


def test_records_match_caffes_converter(oracle, tmp_path):
    import hashlib
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(FIXTURES / "voc_dining.jpg", root / "a.jpg")
    shutil.copy(FIXTURES / "voc_dining.xml", root / "a.xml")
    (root / "b.xml").write_text("<annotation><size><width>500</width><height>375</height></size>"
                                "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>10</xmin>"
                                "<ymin>20</ymin><xmax>200</xmax><ymax>300</ymax></bndbox></object></annotation>")
    (root / "list.txt").write_text("a.jpg a.xml\na.jpg b.xml\n")
    variants = {"jpg": ("jpg", 1, 0, 0), "png": ("png", 1, 0, 0), "raw": ("", 1, 0, 0),
                "resized": ("jpg", 1, 200, 250), "gray": ("png", 0, 0, 0)}
    binary = f"/tmp/deeper_ssd_convert_{hashlib.sha1(CONVERTER.encode()).hexdigest()[:12]}"
    lines = [f"if not os.path.exists({binary!r}):",
             f"    assert os.system({COMPILE.format(binary=binary)!r}) == 0, 'compiling the converter failed'"]
    for name, (enc, color, rh, rw) in variants.items():
        lines += [f"os.makedirs('{name}')",
                  f"assert os.system('{binary} root/ root/list.txt labelmap.prototxt \"{enc}\" {color} {rh} {rw} {name}') == 0",
                  f"for i in range(2): out['{name}_%d' % i] = np.frombuffer(open('{name}/rec_%d.bin' % i, 'rb').read(), np.uint8)"]
    files = {"convert.cpp": CONVERTER, "labelmap.prototxt": LABELMAP.read_text(),
             "root/a.jpg": root / "a.jpg", "root/a.xml": root / "a.xml", "root/b.xml": root / "b.xml",
             "root/list.txt": (root / "list.txt").read_text()}
    caffe = oracle.run("\n".join(lines), files)
    for name, (enc, color, rh, rw) in variants.items():
        options = detection(encode_type=enc, encoded=bool(enc), gray=not color,
                            resize_height=rh, resize_width=rw)
        build_annoset(root, root / "list.txt", root / name, options)
        ours_records = records(root / name)
        assert len(ours_records) == 2
        for i, (_, ours) in enumerate(ours_records):
            theirs = caffe_pb2.AnnotatedDatum.FromString(caffe[f"{name}_{i}"].tobytes())
            if name in ("jpg", "gray") and not theirs.datum.HasField("height"):
                # the oracle's fork stores the original file without channels/height/width;
                # weiliu89's ssd branch (followed here) fills them from the decoded image
                for field in ("channels", "height", "width"):
                    ours.datum.ClearField(field)
            assert ours.SerializeToString() == theirs.SerializeToString(), f"{name} record {i}"
