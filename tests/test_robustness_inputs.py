"""Bad input through the entry points: every case of the matrix below either succeeds (a documented
skip with a warning where something is dropped) or ends with exactly one line ``error: ...`` naming the file, image
id or config key, exit code 2 and no traceback.

| case                                              | behaviour                                                     |
| ------------------------------------------------- | ------------------------------------------------------------- |
| truncated / zero-byte / corrupt JPEG, image file  | propose: the other images are computed and kept, then exit 2  |
| missing on disk, split id without XML             | naming the first bad file (+ how many more); rerun resumes    |
| same, in a DataLoader worker (train_detector)     | exit 2, one line naming the file (no worker traceback)        |
| 16-bit, palette, grey, RGBA PNG; CMYK JPEG; 1x1   | load as RGB, proposals computed (1x1: none), exit 0           |
| EXIF-rotated photo                                | annotation on the stored pixels (XML size = stored size):     |
|                                                   | boxes / masks rotated with the image; else kept (see datasets)|
| XML: no <bndbox>, xmin > xmax, unknown class,     | exit 2 naming the XML file and the object                     |
| non-numeric / nan / inf coordinate, broken XML    |                                                               |
| XML: box partly outside the image                 | clipped, warning naming the file                              |
| XML: box entirely outside the image               | skipped, warning naming the file                              |
| image without objects                             | evaluated; skipped for training (info with the count)         |
| COCO: empty or self-intersecting polygon          | empty / even-odd mask; the object keeps its box; exit 0       |
| a method yields no proposals for an image         | stored as 0 boxes; testing warns with the count; exit 0       |
| NaN / inf in a store file, truncated store file   | exit 2 naming the file and the image id                       |
| store of another dataset or split, incomplete     | exit 2 naming the store and the split                         |
| config: unknown key, wrong type, bad YAML         | exit 2 naming the key (and the file)                          |
| checkpoint: missing, truncated, another kind,     | exit 2 naming the file (CheckpointError)                      |
| weights of another shape, missing weight file     |                                                               |
"""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load_config, to_dict
from core.datasets import CocoDataset, VOCDataset
from core.io import atomic_torch_save, load_checkpoint
from core.store import ProposalStore
from test_robustness_common import (assert_ok, assert_user_error, jpeg_bytes, make_voc, run_entry, scene,
                                    voc_xml)

torch.set_num_threads(1)

SMALL_DET = ["detector.trunk=small", "detector.pretrained=", "detector.fc_dim=32", "detector.scales=[64]",
             "detector.test_scale=64", "detector.max_size=128", "detector.workers=0", "detector.log_every=1",
             "detector.lr=0.01", "detector.train_top=0", "detector.iters=2", "detector.checkpoint_every=2",
             "deepmask.trunk=small"]


def sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


def box_store(path, ds, empty=(), nan=()):
    """A finished store of `ds`: the whole image and its top-left quarter per image (0 boxes for `empty`)."""
    st = ProposalStore.create(path, method="boxes", params={}, dataset=ds.name, split=ds.split,
                              image_ids=ds.image_ids)
    for r in ds:
        if r.image_id in empty:
            st.put(r.image_id, np.zeros((0, 4)), np.zeros(0))
        else:
            st.put(r.image_id, [[0, 0, r.width, r.height], [0, 0, r.width / 2, r.height / 2]], [1.0, 0.5])
    st.finalize()
    for iid in nan:  # bypass put()'s check, as a foreign or damaged file would
        buf = io.BytesIO()
        np.savez(buf, boxes=np.array([[0, 0, np.nan, 5]], np.float32), scores=np.array([np.inf], np.float32))
        (st.path / "images" / f"{iid}.npz").write_bytes(buf.getvalue())
    return st


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VOC set (3 images, one without objects), its store and a 2-iteration Fast R-CNN."""
    root = tmp_path_factory.mktemp("trained")
    imgs = {f"t{k}": scene(k)[0] for k in range(3)}
    voc = make_voc(root, imgs, split="val", objects={"t2": []})
    ds = VOCDataset(voc, "val")
    store = box_store(root / "store", ds, empty=("t1",))
    res = run_entry("pipelines.train_detector", ["--proposals", store.path, "--voc", voc, "--split", "val",
                                                 "--out", root / "det", "--no-progress", *sets(SMALL_DET)])
    assert_ok(res)
    return {"root": root, "voc": voc, "ds": ds, "store": store.path, "ckpt": root / "det" / "final.pt",
            "train_err": res.err}


def propose(voc, out, *extra):
    return run_entry("pipelines.propose", ["--voc", voc, "--split", "val", "--out", out, "--no-progress", *extra])


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("case", ["truncated", "zero", "corrupt", "missing_image", "missing_xml"])
def test_bad_image_files_propose(tmp_path, case):
    good, _ = scene(0)
    data = jpeg_bytes(scene(1)[0])
    bad = {"truncated": data[: len(data) // 2], "zero": b"", "corrupt": b"\xff\xd8\xff\xe0" + b"not a jpeg" * 30,
           "missing_image": None, "missing_xml": data}[case]
    voc = make_voc(tmp_path, {"good": good, "bad": bad})
    if case == "missing_xml":
        (voc / "Annotations" / "bad.xml").unlink()
    res = propose(voc, tmp_path / "st")
    needle = {"missing_xml": "Annotations/bad.xml"}.get(case, "JPEGImages/bad.jpg")
    line = assert_user_error(res, needle, "rerun to resume")
    assert {"truncated": "truncated", "zero": "0 bytes", "corrupt": "corrupt", "missing_image": "not found",
            "missing_xml": "image id bad"}[case] in line
    st = ProposalStore.open(tmp_path / "st", require_complete=False)
    assert st.done("good") and not st.done("bad")  # finished work is kept


def test_bad_image_in_dataloader_worker_is_one_line(trained, tmp_path):
    """A worker process re-raises with its traceback inside the message: the entry point still prints one line."""
    imgs = {f"w{k}": scene(k)[0] for k in range(2)}
    data = jpeg_bytes(scene(5)[0])
    imgs["w2"] = data[: len(data) // 3]
    voc = make_voc(tmp_path, imgs)
    ds = VOCDataset(voc, "val")
    st = box_store(tmp_path / "st", ds)
    res = run_entry("pipelines.test_detector", ["--checkpoint", trained["ckpt"], "--proposals", st.path, "--top", 2,
                                                "--voc", voc, "--split", "val", "--out", tmp_path / "res",
                                                "--no-progress", "--set", "detector.workers=1"])
    assert_user_error(res, "w2.jpg", "truncated")


def test_image_modes_and_tiny_image_propose(tmp_path):
    good, _ = scene(0)
    grey = good.mean(2).astype(np.uint8)
    voc = make_voc(tmp_path, {"good": good})
    files = {
        "png16": lambda p: Image.fromarray(grey.astype(np.uint16) * 257).save(p),
        "palette": lambda p: Image.fromarray(good).convert("P").save(p),
        "grey": lambda p: Image.fromarray(grey).save(p),
        "rgba": lambda p: Image.fromarray(np.dstack([good, np.full(grey.shape, 128, np.uint8)])).save(p),
        "cmyk": lambda p: Image.fromarray(good).convert("CMYK").save(p),
        "one": lambda p: Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(p),
    }
    ids = ["good"]
    for iid, write in files.items():
        fname = f"{iid}.{'jpg' if iid == 'cmyk' else 'png'}"
        write(voc / "JPEGImages" / fname)
        w, h = (1, 1) if iid == "one" else (96, 72)
        (voc / "Annotations" / f"{iid}.xml").write_text(voc_xml(iid, w, h, [("dog", 1, 1, w, h)], filename=fname))
        ids.append(iid)
    (voc / "ImageSets/Main/val.txt").write_text("\n".join(ids) + "\n")
    assert_ok(propose(voc, tmp_path / "st"))
    st = ProposalStore.open(tmp_path / "st")
    for iid in ids[:-1]:
        assert len(st.get(iid)) > 0, iid
    assert len(st.get("one")) == 0  # nothing of min_box 20 px fits in a 1 x 1 image
    assert_ok(run_entry("pipelines.evaluate", ["proposals", "--voc", voc, "--split", "val",
                                               "--proposals", tmp_path / "st", "--no-sizes"]))


# ------------------------------------------------------------------------------------------------ EXIF
def _exif_jpeg(path, raw: np.ndarray, orientation: int):
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=98)


def _raw_scene():
    """80 x 50 stored pixels, a white object at x 10..30, y 5..15 (0-based edges 10, 5, 30, 15)."""
    raw = np.zeros((50, 80, 3), np.uint8)
    raw[5:15, 10:30] = 255
    return raw, (10, 5, 30, 15)


def _white_box(img):
    ys, xs = np.nonzero(img[..., 0] > 127)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_voc_boxes_follow_the_annotated_pixels(tmp_path, orientation):
    """XML <size> = stored size (VOC-era annotation on the pixels on disk): boxes are rotated with the image that
    load_image returns; XML <size> = displayed size (annotated on the rotated photo): boxes are kept."""
    from core.images import load_image

    raw, (x1, y1, x2, y2) = _raw_scene()
    voc = make_voc(tmp_path, {"r": None})
    path = voc / "JPEGImages" / "r.jpg"
    _exif_jpeg(path, raw, orientation)
    shown = load_image(path)
    target = _white_box(shown)
    (voc / "Annotations" / "r.xml").write_text(voc_xml("r", 80, 50, [("dog", x1 + 1, y1 + 1, x2, y2)]))
    rec = VOCDataset(voc, "val").get("r")
    if orientation in (1, 5, 6, 7, 8):  # the size tells: annotated on the stored pixels
        assert (rec.height, rec.width) == shown.shape[:2]
        assert rec.boxes.tolist() == [target]
    else:  # 2-4 keep the size: ambiguous, taken as annotated on the displayed image (documented)
        assert rec.boxes.tolist() == [[x1, y1, x2, y2]]
    # annotated on the displayed image: kept as written
    h, w = shown.shape[:2]
    t = [int(v) for v in target]
    (voc / "Annotations" / "r.xml").write_text(voc_xml("r", w, h, [("dog", t[0] + 1, t[1] + 1, t[2], t[3])]))
    rec = VOCDataset(voc, "val").get("r")
    assert (rec.width, rec.height) == (w, h) and rec.boxes.tolist() == [target]


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_coco_boxes_and_masks_follow_the_rotation(tmp_path, orientation):
    from pycocotools import mask as mask_utils

    from core.images import load_image

    raw, (x1, y1, x2, y2) = _raw_scene()
    (tmp_path / "im").mkdir()
    _exif_jpeg(tmp_path / "im" / "1.jpg", raw, orientation)
    _exif_jpeg(tmp_path / "im" / "2.jpg", raw, orientation)
    rle = mask_utils.encode(np.asfortranarray((raw[..., 0] > 127).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    poly = [[x1, y1, x2, y1, x2, y2, x1, y2]]
    ann = {"images": [{"id": 1, "file_name": "1.jpg", "width": 80, "height": 50},
                      {"id": 2, "file_name": "2.jpg", "width": 80, "height": 50}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": poly, "iscrowd": 0,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": 200.0},
                           {"id": 2, "image_id": 2, "category_id": 1, "segmentation": rle, "iscrowd": 0,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": 200.0}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path / "im")
    shown = load_image(tmp_path / "im" / "1.jpg")
    for iid in ("1", "2"):
        rec = ds.get(iid)
        assert (rec.height, rec.width) == shown.shape[:2] == (80, 50)
        assert rec.boxes.tolist() == [_white_box(shown)]
        assert np.array_equal(rec.masks()[0], shown[..., 0] > 127)


# ------------------------------------------------------------------------------------------------ XML
XML_CASES = {
    "no_bndbox": ([("dog", None)], "object 0 ('dog') has no <bndbox>"),
    "xmin_gt_xmax": ([("dog", 50, 10, 20, 30)], "xmin > xmax"),
    "unknown_class": ([("unicorn", 1, 1, 20, 20)], "unknown class 'unicorn'"),
    "non_numeric": ([("dog", "ten", 1, 20, 20)], "non-numeric"),
    "nan": ([("dog", "nan", 1, 20, 20)], "non-finite"),
    "inf": ([("dog", 1, 1, "inf", 20)], "non-finite"),
}


@pytest.mark.parametrize("case", list(XML_CASES) + ["broken"])
def test_bad_xml_evaluate_and_propose(tmp_path, case):
    voc = make_voc(tmp_path, {"a": scene(0)[0], "b": scene(1)[0]},
                   objects={"b": XML_CASES[case][0]} if case in XML_CASES else None)
    if case == "broken":
        (voc / "Annotations" / "b.xml").write_text("<annotation><object><name>dog</name></annotation>")
    needle = XML_CASES[case][1] if case in XML_CASES else "broken XML"
    (tmp_path / "res").mkdir()
    res = run_entry("pipelines.evaluate", ["detections", "--voc", voc, "--split", "val", "--results", tmp_path / "res"])
    assert_user_error(res, "Annotations/b.xml", needle)
    # propose needs the XML only for the image path: the error names it, the other image is kept
    if case == "broken":
        assert_user_error(propose(voc, tmp_path / "st"), "Annotations/b.xml")


def test_boxes_outside_the_image_clipped_or_skipped(trained, tmp_path, caplog):
    voc = make_voc(tmp_path, {"a": scene(0)[0]}, objects={"a": [("dog", 60, 10, 200, 40), ("cat", 150, 5, 190, 30),
                                                                   ("dog", 2, 2, 30, 30)]})
    with caplog.at_level(logging.WARNING):
        rec = VOCDataset(voc, "val").get("a")
    assert rec.boxes.tolist() == [[59, 9, 96, 40], [1, 1, 30, 30]]  # clipped; the cat is outside, skipped
    assert rec.labels.tolist() == [11, 11]
    assert "clipped" in caplog.text and "lies outside the 96x72 image, skipped" in caplog.text
    assert "a.xml" in caplog.text


def test_image_without_objects(trained, tmp_path, caplog):
    """Training skips it with a count (the fixture trained on 2 of 3 images); evaluation keeps it."""
    from detector.train import TrainEntries

    with caplog.at_level(logging.INFO):
        assert TrainEntries(trained["ds"]).skipped == 1
    assert "skipping 1 of 3 training images without (non-difficult) ground-truth objects" in caplog.text
    from detector.voc_results import write_results

    write_results(tmp_path / "res", "val", {"dog": {"t0": ([[20, 15, 70, 50]], [0.9])}}, trained["ds"].classes)
    res = run_entry("pipelines.evaluate", ["detections", "--voc", trained["voc"], "--split", "val",
                                           "--results", tmp_path / "res"])
    assert_ok(res)
    assert "3 images" in res.out


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_empty_and_self_intersecting_polygons(tmp_path):
    from proposals.deepmask.sampler import PatchSampler, SamplerParams, load_records

    (tmp_path / "im").mkdir()
    images, anns = [], []
    segs = [[], [[]], [[10, 10, 60]], [[10, 10, 60, 60, 60, 10, 10, 60]], [[5, 5, 50, 5, 50, 40, 5, 40]]]
    for i, seg in enumerate(segs):
        Image.fromarray(scene(i, 72, 96)[0]).save(tmp_path / "im" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 96, "height": 72})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": seg, "iscrowd": 0,
                     "bbox": [10, 10, 50, 50], "area": 2500.0})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "thing"}]}))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path / "im")
    areas = [int(ds.get(str(i + 1)).masks()[0].sum()) for i in range(len(segs))]
    assert areas[:3] == [0, 0, 0]  # empty / degenerate polygons: empty masks, the objects keep their boxes
    assert 0 < areas[3] < 2500 and areas[4] == 45 * 35  # the bow tie fills its two triangles
    from core.config import MaskSource

    cfg = load_config(None, ["deepmask.patch_size=32", "deepmask.object_size=16", "deepmask.batch_size=4"])
    recs = load_records([MaskSource(ann=str(tmp_path / "ann.json"), images=str(tmp_path / "im"))])
    sampler = PatchSampler(recs, SamplerParams.from_config(cfg.deepmask, (0, 0, 0)), seed=0)
    for t in range(2):
        b = sampler.batch(t)
        assert b["images"].shape[0] == 4 and torch.isfinite(b["labels"]).all()
    # proposal recall with these as ground truth (segm): runs; the empty masks are just unmatched objects
    results = [{"image_id": i + 1, "bbox": [10, 10, 50, 50], "score": 1.0} for i in range(len(segs))]
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert_ok(run_entry("pipelines.evaluate", ["proposals", "--coco", tmp_path / "ann.json", "--proposals",
                                               tmp_path / "res.json", "--no-sizes"]))


# ------------------------------------------------------------------------------------------------ proposals
def test_no_proposals_for_an_image(trained, tmp_path, caplog):
    """t1 has 0 proposals in the store: trained on (gt RoIs only), tested (no detections), warned with a count."""
    caplog.set_level(logging.WARNING)
    res = run_entry("pipelines.test_detector", ["--checkpoint", trained["ckpt"], "--proposals", trained["store"],
                                                "--top", "1,2", "--out", tmp_path / "res", "--no-progress",
                                                "--voc", trained["voc"], "--split", "val"])
    assert_ok(res)
    assert "1 images have no proposals" in caplog.text
    assert json.loads(res.out.strip().splitlines()[-1])["mAP"].keys() == {"1", "2"}


@pytest.mark.parametrize("entry", ["test_detector", "train_detector", "evaluate"])
@pytest.mark.parametrize("case", ["nan", "truncated", "other_split", "incomplete"])
def test_bad_stores(trained, tmp_path, entry, case):
    ds = trained["ds"]
    if case == "other_split":
        voc2 = make_voc(tmp_path / "other", {"t0": scene(0)[0]}, split="train")
        st = box_store(tmp_path / "st", VOCDataset(voc2, "train"))
        # same folder name VOC2007 but another dataset root: named in the message
        needle = ["split 'train'", str(tmp_path / "st")]
    else:
        st = box_store(tmp_path / "st", ds, nan=("t0",) if case == "nan" else ())
        needle = [str(tmp_path / "st")]
        if case == "nan":
            needle += ["t0", "NaN or infinite"]
        elif case == "truncated":
            f = st.path / "images" / "t0.npz"
            f.write_bytes(f.read_bytes()[:40])
            needle += ["t0.npz", "corrupt proposal file of image 't0'"]
        else:
            meta = json.loads((st.path / "meta.json").read_text())
            meta["complete"] = False
            (st.path / "meta.json").write_text(json.dumps(meta))
            needle += ["incomplete"]
    common = ["--voc", trained["voc"], "--split", "val"]
    if entry == "test_detector":
        argv = ["--checkpoint", trained["ckpt"], "--proposals", st.path, "--top", 2, "--out", tmp_path / "res",
                "--no-progress", *common]
    elif entry == "train_detector":
        argv = ["--proposals", st.path, "--out", tmp_path / "det", "--no-progress", *common, *sets(SMALL_DET)]
    else:
        argv = ["proposals", "--proposals", st.path, "--no-sizes", *common]
    res = run_entry(f"pipelines.{entry}", argv)
    if entry == "train_detector" and case == "nan" and res.code == 0:
        pytest.fail("a NaN proposal was trained on")
    assert_user_error(res, *needle)


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("entry", ["propose", "train_detector", "train_proposer", "run"])
def test_config_errors_name_the_key(tmp_path, entry):
    base = {"propose": ["--voc", tmp_path, "--split", "val", "--out", tmp_path / "o"],
            "train_detector": ["--proposals", tmp_path / "st", "--out", tmp_path / "o"],
            "train_proposer": ["--out", tmp_path / "o"], "run": []}[entry]
    m = f"pipelines.{entry}"
    assert_user_error(run_entry(m, [*base, "--set", "detector.lrr=0.1"]), "detector.lrr", "did you mean 'lr'")
    assert_user_error(run_entry(m, [*base, "--set", "ss.top_n=many"]), "ss.top_n", "integer")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("deepmask:\n  iters: 10\n  batch_size: [1, 2]\n")
    assert_user_error(run_entry(m, [*base, "--config", cfg]), "c.yaml", "deepmask.batch_size")
    cfg.write_text("detector:\n  scales: [600\n")
    assert_user_error(run_entry(m, [*base, "--config", cfg]), "c.yaml", "invalid YAML")
    cfg.write_text("unknown_section:\n  a: 1\n")
    assert_user_error(run_entry(m, [*base, "--config", cfg]), "c.yaml", "unknown_section")
    assert_user_error(run_entry(m, [*base, "--config", tmp_path / "none.yaml"]), "none.yaml", "not found")
    assert_user_error(run_entry(m, [*base, "--set", "detector.lr=nan"]), "detector.lr", "finite")


def test_config_floats_without_a_dot():
    """PyYAML (YAML 1.1) reads 1e-4 as a string: a float key takes it as the number."""
    cfg = load_config(None, ["detector.lr=1e-4", "deepmask.gamma=1E30", "detector.fc_dim=64"])
    assert cfg.detector.lr == 1e-4 and cfg.deepmask.gamma == 1e30


# ------------------------------------------------------------------------------------------------ checkpoints
def test_bad_checkpoints(trained, tmp_path):
    ck = load_checkpoint(trained["ckpt"])
    test = ["--proposals", trained["store"], "--top", 2, "--voc", trained["voc"], "--split", "val",
            "--out", tmp_path / "res", "--no-progress"]

    def run_test(path):
        return run_entry("pipelines.test_detector", ["--checkpoint", path, *test])

    assert_user_error(run_test(tmp_path / "none.pt"), "none.pt", "not found")
    (tmp_path / "trunc.pt").write_bytes(trained["ckpt"].read_bytes()[:1000])
    assert_user_error(run_test(tmp_path / "trunc.pt"), "trunc.pt", "cannot read checkpoint")
    (tmp_path / "text.pt").write_text("hello")
    assert_user_error(run_test(tmp_path / "text.pt"), "text.pt")
    # a DeepMask-like checkpoint (model + config, no classes) given as the detector
    atomic_torch_save({"model": {}, "config": ck["config"], "iteration": 1}, tmp_path / "dm.pt")
    assert_user_error(run_test(tmp_path / "dm.pt"), "dm.pt", "not a Fast R-CNN checkpoint")
    # weights that do not fit the config (another fc width)
    cfg = dict(ck, config=to_dict(load_config(None, [*SMALL_DET, "detector.fc_dim=48"])))
    atomic_torch_save(cfg, tmp_path / "shape.pt")
    assert_user_error(run_test(tmp_path / "shape.pt"), "shape.pt", "do not fit")
    # a detector checkpoint given as DeepMask
    res = run_entry("pipelines.propose", ["--voc", trained["voc"], "--split", "val", "--out", tmp_path / "st",
                                          "--method", "deepmask", "--checkpoint", trained["ckpt"], "--no-progress"])
    assert_user_error(res, "final.pt")
    # a missing pretrained weight file
    res = run_entry("pipelines.train_detector", ["--proposals", trained["store"], "--voc", trained["voc"],
                                                 "--split", "val", "--out", tmp_path / "d", "--no-progress",
                                                 *sets(SMALL_DET), "--set", f"detector.pretrained={tmp_path}/w.pth"])
    assert_user_error(res, "w.pth", "not found")
