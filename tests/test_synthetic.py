"""The built-in synthetic dataset (core/shapes.py, core/synthetic.py, pipelines/make_shapes.py)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from core.boxes import mask_to_box, masks_to_boxes, xywh_to_xyxy
from core.datasets import VOC_CLASSES, CocoDataset, VOCDataset
from core.errors import UserError
from core.images import load_image
from core.shapes import (DIFFICULT_AREA, DIFFICULT_SIDE, DIFFICULT_VISIBLE, MAX_OBJECTS, MIN_KEEP_AREA,
                         SHAPE_CLASSES, render)
from core.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(trainval=8, test=4, size=96, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate(out, workers=1, **SMALL)
    return out


def _xml_objects(path: Path):
    root = ET.parse(path).getroot()
    size = root.find("size")
    wh = int(size.findtext("width")), int(size.findtext("height"))
    objs = []
    for o in root.findall("object"):
        bb = o.find("bndbox")
        x1, y1, x2, y2 = (int(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        objs.append(dict(name=o.findtext("name"), box=(x1 - 1, y1 - 1, x2, y2),  # 1-based inclusive -> edges
                         difficult=int(o.findtext("difficult")), truncated=int(o.findtext("truncated"))))
    return root.findtext("filename"), wh, objs


def test_layout_and_splits(shapes):
    voc = shapes / "VOC2007"
    main = voc / "ImageSets" / "Main"
    split = {s: (main / f"{s}.txt").read_text().split() for s in ("trainval", "train", "val", "test")}
    assert split["trainval"] == [f"{i:06d}" for i in range(1, 9)]
    assert split["test"] == [f"{i:06d}" for i in range(9, 13)]
    assert split["train"] + split["val"] == split["trainval"] and split["val"]
    assert len(split["train"]) == 7  # first 80% (rounded up, val kept non-empty)
    for i in split["trainval"] + split["test"]:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file() and (voc / "Annotations" / f"{i}.xml").is_file()
    assert (shapes / "annotations" / "instances_trainval.json").is_file()
    assert (shapes / "annotations" / "instances_test.json").is_file()
    # nothing left behind by the atomic writes
    assert not [p for p in shapes.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_boxes_are_mask_extents_and_xml_matches_json(shapes, split):
    voc = shapes / "VOC2007"
    coco = CocoDataset(shapes / "annotations" / f"instances_{split}.json", voc / "JPEGImages")
    assert coco.classes == VOC_CLASSES  # all 20 VOC categories, ids 1..20: same label indices as VOC
    vocds = VOCDataset(voc, split)
    assert vocds.image_ids == [f"{int(i):06d}" for i in coco.image_ids]
    n_obj = 0
    for vid, cid in zip(vocds.image_ids, coco.image_ids):
        crec, vrec = coco.get(cid), vocds.get(vid)
        fname, (w, h), xml_objs = _xml_objects(voc / "Annotations" / f"{vid}.xml")
        assert fname == f"{vid}.jpg" and Path(crec.path).name == fname
        img = load_image(crec.path)
        assert img.shape == (h, w, 3) == (crec.height, crec.width, 3) == (vrec.height, vrec.width, 3)
        assert 1 <= len(xml_objs) <= MAX_OBJECTS
        masks = crec.masks()
        assert masks.shape == (len(xml_objs), h, w)
        mask_boxes = masks_to_boxes(masks)
        anns = coco.coco.imgToAnns[int(cid)]
        np.testing.assert_array_equal(crec.boxes, mask_boxes)  # COCO bbox = mask extent
        np.testing.assert_array_equal(vrec.boxes, mask_boxes)  # VOC box (0-based edges) = mask extent
        np.testing.assert_array_equal(np.array([o["box"] for o in xml_objs], np.float32), mask_boxes)
        np.testing.assert_array_equal(vrec.labels, crec.labels)
        assert [o["name"] for o in xml_objs] == [VOC_CLASSES[k] for k in crec.labels]
        assert all(VOC_CLASSES[k] in SHAPE_CLASSES for k in crec.labels)
        for o, a, m, box in zip(xml_objs, anns, masks, mask_boxes):
            assert a["iscrowd"] == 0 and a["area"] == m.sum() >= MIN_KEEP_AREA
            assert isinstance(a["segmentation"]["counts"], str)
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h  # inside the image
            bw, bh = box[2] - box[0], box[3] - box[1]
            if m.sum() < DIFFICULT_AREA or min(bw, bh) < DIFFICULT_SIDE:
                assert o["difficult"] == 1, (vid, o)
        np.testing.assert_array_equal(vrec.difficult, [bool(o["difficult"]) for o in xml_objs])
        assert not crec.difficult.any()  # COCO keeps difficult objects as iscrowd 0
        n_obj += len(xml_objs)
    assert n_obj >= len(vocds)


def test_pycocotools_loads(shapes):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO(str(shapes / "annotations" / "instances_trainval.json"))
    assert sorted(c.getImgIds()) == list(range(1, 9))
    ann = c.loadAnns(c.getAnnIds())[0]
    m = c.annToMask(ann)
    np.testing.assert_array_equal(mask_to_box(m), xywh_to_xyxy(np.array([ann["bbox"]], np.float32))[0])


def test_deterministic_bytes(shapes, tmp_path):
    again = tmp_path / "again"
    generate(again, workers=2, **SMALL)  # other worker count: same bytes
    a, b = _files(shapes), _files(again)
    assert a.keys() == b.keys() and len(a) == 2 * 12 + 4 + 2 + 1
    for k in a:
        assert a[k] == b[k], k
    other = tmp_path / "other"
    generate(other, workers=1, **dict(SMALL, seed=4))
    c = _files(other)
    assert c.keys() == a.keys()
    assert all(c[k] != a[k] for k in a if k.endswith((".jpg", ".json")))


def test_render_rules_and_variety():
    labels, sizes, n_occluded, n_difficult, counts = set(), [], 0, 0, []
    for i in range(40):
        img, objs = render(7, i, 128)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and max(h, w) == 128 and min(h, w) >= 96
        assert 1 <= len(objs) <= MAX_OBJECTS
        counts.append(len(objs))
        union = np.zeros((h, w), bool)
        for o in objs:
            m = o["mask"]
            assert not (union & m).any()  # visible masks are disjoint (occlusion)
            union |= m
            assert o["area"] == m.sum() >= MIN_KEEP_AREA and tuple(mask_to_box(m)) == o["box"]
            bw, bh = o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]
            rule = (o["area"] < DIFFICULT_AREA or min(bw, bh) < DIFFICULT_SIDE
                    or o["area"] < DIFFICULT_VISIBLE * o["full_area"])
            assert o["difficult"] == rule
            labels.add(o["label"])
            sizes.append(max(bw, bh))
            n_occluded += o["area"] < o["full_area"]
            n_difficult += o["difficult"]
    assert labels == set(range(len(SHAPE_CLASSES)))
    assert min(sizes) <= 16 and max(sizes) >= 64  # wide range of object sizes
    assert n_occluded > 0 and 0 < n_difficult < sum(counts)
    assert len(set(counts)) >= 3
    a, _ = render(7, 0, 128)
    b, _ = render(7, 0, 128)
    np.testing.assert_array_equal(a, b)


def test_skip_regenerate_and_refuse_foreign(tmp_path):
    out = tmp_path / "s"
    generate(out, trainval=4, test=2, size=64, seed=0)
    jpg = out / "VOC2007" / "JPEGImages" / "000006.jpg"
    mtime = jpg.stat().st_mtime_ns
    generate(out, trainval=4, test=2, size=64, seed=0)  # complete, same params: skipped
    assert jpg.stat().st_mtime_ns == mtime
    generate(out, trainval=3, test=2, size=64, seed=0)  # different params: regenerated, stale ids removed
    assert not jpg.exists() and not (out / "VOC2007" / "Annotations" / "000006.xml").exists()
    assert (out / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split() == ["000004", "000005"]
    foreign = tmp_path / "real"
    (foreign / "VOC2007" / "Annotations").mkdir(parents=True)
    with pytest.raises(UserError, match="not made by make_shapes"):
        generate(foreign, trainval=4, test=2, size=64, seed=0)
    for bad in (dict(size=0), dict(trainval=1), dict(test=0), dict(seed=-1), dict(workers=-1)):
        with pytest.raises(UserError):
            generate(tmp_path / "bad", **dict(dict(trainval=4, test=2, size=64, seed=0), **bad))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipelines.make_shapes", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    r = _cli("--out", str(tmp_path / "o"), "--trainval", "3", "--test", "2", "--size", "64", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split() == \
        ["000001", "000002", "000003"]
    assert len(list((tmp_path / "o" / "VOC2007" / "JPEGImages").glob("*.jpg"))) == 5
    r = _cli("--out", str(tmp_path / "p"), "--size", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error:") and "size" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("--out", str(blocker / "sub"), "--trainval", "3", "--test", "1", "--size", "64")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert str(blocker / "sub") in r.stderr
