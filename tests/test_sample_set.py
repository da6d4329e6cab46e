"""The bundled synthetic drone set (deeper_ssd.data.sample, deeper-ssd make-sample)."""
import json
import time
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from deeper_ssd import cli
from deeper_ssd.data.annoset import AnnotatedDB
from deeper_ssd.data.sample import AIRFRAMES, make_sample_set, render_airframe
from deeper_ssd.eval.sizes import SIZE_BUCKETS, bucket_of


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "generated"
    start = time.perf_counter()
    report = make_sample_set(out, seed=0)                   # the default 300 + 100 images
    return out, report, time.perf_counter() - start


def test_default_set_builds_quickly_with_lmdbs_and_lists(sample):
    out, report, seconds = sample
    assert seconds < 60
    assert (report.train, report.test) == (300, 100)
    for subset, count in (("trainval", 300), ("test", 100)):
        lines = (out / f"{subset}.txt").read_text().splitlines()
        assert len(lines) == count
        db = AnnotatedDB(out / f"{subset}_lmdb")
        assert len(db) == count
        first = db.datum(db.keys()[0])
        assert first.datum.encoded and (first.datum.height, first.datum.width) == (360, 480)
        db.close()
    sizes = (out / "test_name_size.txt").read_text().splitlines()
    assert len(sizes) == 100 and sizes[0] == "test_00000 360 480"
    assert 'name: "drone"' in (out / "labelmap_drone.prototxt").read_text()


def test_size_distribution_follows_table_2(sample):
    out, report, _ = sample
    counts = {name: 0 for name, _, _ in SIZE_BUCKETS}
    for xml in sorted((out / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        for obj in root.findall("object"):
            x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 < x1 <= 480 and 1 <= y0 < y1 <= 360
            assert obj.findtext("name") == "drone" and obj.findtext("pose") in AIRFRAMES
            counts[bucket_of((x1 - x0) * (y1 - y0) / (480 * 360))] += 1
    assert counts == report.objects
    total = sum(counts.values())
    assert total > 500
    assert abs(counts["S"] / total - 0.6362) < 0.06                     # the paper's 63.62 %
    assert counts["M"] > counts["L"] > counts["XL"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["objects_per_bucket"] == counts


def test_same_seed_same_files(tmp_path):
    a = make_sample_set(tmp_path / "a", seed=4, train=6, test=2)
    b = make_sample_set(tmp_path / "b", seed=4, train=6, test=2)
    make_sample_set(tmp_path / "c", seed=5, train=6, test=2)
    for name in ("JPEGImages/trainval_00003.jpg", "Annotations/trainval_00003.xml", "test.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/JPEGImages/trainval_00003.jpg").read_bytes() != \
        (tmp_path / "c/JPEGImages/trainval_00003.jpg").read_bytes()
    assert a.objects == b.objects
    # the test images do not depend on the number of training images
    make_sample_set(tmp_path / "d", seed=4, train=3, test=2)
    for name in ("JPEGImages/test_00001.jpg", "Annotations/test_00001.xml", "test.txt",
                 "test_name_size.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()


def test_airframes_render():
    for kind in AIRFRAMES:
        mask = render_airframe(kind, np.random.default_rng(0), 64)
        assert mask.shape == (64, 64) and 0.02 < mask.mean() < 0.6
    with pytest.raises(ValueError, match="unknown airframe"):
        render_airframe("balloon", np.random.default_rng(0))


def test_make_sample_command(tmp_path, capsys):
    assert cli.main(["make-sample", "--out", str(tmp_path / "s"), "--train", "3", "--test", "2"]) == 0
    assert "3 train + 2 test images" in capsys.readouterr().out
    img = cv2.imread(str(tmp_path / "s" / "JPEGImages" / "test_00001.jpg"))
    assert img.shape == (360, 480, 3)
    assert cli.main(["make-sample", "--out", str(tmp_path / "t"), "--backgrounds", str(tmp_path)]) == 2
    assert "no readable background photos" in capsys.readouterr().err
