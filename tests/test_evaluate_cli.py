"""pipelines.evaluate: detections (VOC07 mAP from devkit result files) and proposals (AR) subcommands, on a tiny
hand-made VOCdevkit folder; bad input -> one 'error:' line naming the file and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.cli import run_main
from core.datasets import VOC_CLASSES
from detector.voc_results import write_results
from pipelines.evaluate import main

REPO = Path(__file__).resolve().parents[1]

# image id -> objects (class, xmin, ymin, xmax, ymax 1-based inclusive, difficult)
OBJECTS = {
    "000001": [("dog", 11, 11, 60, 60, 0), ("person", 101, 21, 150, 90, 0)],
    "000002": [("dog", 1, 1, 40, 40, 0), ("dog", 61, 11, 120, 80, 1)],
    "000003": [],
}


def make_voc(root: Path) -> Path:
    voc = root / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for iid, objs in OBJECTS.items():
        o = "".join(
            f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for c, x1, y1, x2, y2, d in objs)
        (voc / "Annotations" / f"{iid}.xml").write_text(
            f"<annotation><filename>{iid}.jpg</filename><size><width>200</width><height>100</height>"
            f"<depth>3</depth></size>{o}</annotation>")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("\n".join(OBJECTS) + "\n")
    return voc


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def box(x1, y1, x2, y2):  # 1-based inclusive -> 0-based edges
    return [x1 - 1, y1 - 1, x2, y2]


def test_detections_round_trip(tmp_path, capsys):
    voc = make_voc(tmp_path)
    # dog: 000001 perfect (.9), 000002 perfect (.8), a duplicate on 000002 (.7), the difficult dog (.95, ignored)
    #   npos 2: sequence (ignored), TP, TP, FP -> rec [0, .5, 1, 1], prec [0, 1, 1, 2/3] -> AP 1
    # person: a miss on 000003 (.6) then the right box (.5) -> rec [0, 1], prec [0, .5] -> AP .5
    # other 18 classes: no objects, no detections -> AP 0.   mAP = 1.5 / 20
    dets = {
        "dog": {"000001": (np.array([box(11, 11, 60, 60)]), np.array([0.9])),
                "000002": (np.array([box(1, 1, 40, 40), box(1, 1, 40, 40), box(61, 11, 120, 80)]),
                           np.array([0.8, 0.7, 0.95]))},
        "person": {"000003": (np.array([box(101, 21, 150, 90)]), np.array([0.6])),
                   "000001": (np.array([box(101, 21, 150, 90)]), np.array([0.5]))},
    }
    res_dir = tmp_path / "res"
    write_results(res_dir, "val", dets, VOC_CLASSES)
    assert len(list(res_dir.iterdir())) == 20
    code, out, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(res_dir),
                          "--out", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ap"]["dog"] == pytest.approx(1.0)
    assert res["ap"]["person"] == pytest.approx(0.5)
    assert res["ap"]["cat"] == 0.0
    assert res["mAP"] == pytest.approx(1.5 / 20)
    assert list(res["ap"]) == list(VOC_CLASSES)
    assert json.loads((tmp_path / "m.json").read_text()) == res
    assert "mAP" in out.splitlines()[-2]  # the table sits above the JSON line


def test_detections_bad_input(tmp_path, capsys):
    voc = make_voc(tmp_path)
    res_dir = tmp_path / "res"
    write_results(res_dir, "val", {}, VOC_CLASSES)
    # malformed results line
    f = res_dir / "comp4_det_val_dog.txt"
    f.write_text("000001 0.9 12.0 12.0 60.0 60.0\n000002 0.8 1.0 1.0 40.0\n")
    code, out, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(res_dir)], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: ") and f"{f}:2:" in err and "expected 6 fields" in err
    # image id not in the split
    f.write_text("009999 0.9 12.0 12.0 60.0 60.0\n")
    code, _, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(res_dir)], capsys)
    assert code == 2 and "'009999'" in err and "not in the split" in err
    f.write_text("")
    # missing result file
    (res_dir / "comp4_det_val_cat.txt").unlink()
    code, _, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(res_dir)], capsys)
    assert code == 2 and "comp4_det_val_cat.txt" in err and "not found" in err
    write_results(res_dir, "val", {}, VOC_CLASSES)
    # missing VOC folder
    code, _, err = run(["detections", "--voc", str(tmp_path / "nope"), "--split", "val", "--results",
                        str(res_dir)], capsys)
    assert code == 2 and str(tmp_path / "nope") in err
    # missing results folder
    code, _, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(tmp_path / "r2")],
                       capsys)
    assert code == 2 and "r2" in err and "not found" in err
    # broken XML, unknown class
    xml = voc / "Annotations" / "000002.xml"
    xml.write_text("<annotation><size>")
    code, _, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(res_dir)], capsys)
    assert code == 2 and "000002.xml" in err
    xml.write_text("<annotation><size><width>9</width><height>9</height></size><object><name>unicorn</name>"
                   "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    code, _, err = run(["detections", "--voc", str(voc), "--split", "val", "--results", str(res_dir)], capsys)
    assert code == 2 and "000002.xml" in err and "unicorn" in err


def test_proposals_voc_and_errors(tmp_path, capsys):
    voc = make_voc(tmp_path)
    # proposals: exact boxes of the 3 non-difficult objects, plus one far box ranked first on 000001
    props = [
        {"image_id": "000001", "bbox": [150, 0, 40, 10], "score": 0.99},
        {"image_id": "000001", "bbox": [10, 10, 50, 50], "score": 0.9},
        {"image_id": "000001", "bbox": [100, 20, 50, 70], "score": 0.8},
        {"image_id": "000002", "bbox": [0, 0, 40, 40], "score": 0.7},
    ]
    pf = tmp_path / "props.json"
    pf.write_text(json.dumps(props))
    code, out, err = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(pf)], capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for k in ("AR@10", "AR@100", "AR@1000", "AUC", "AR_S@100", "AR_M@100", "AR_L@100", "auc_counts"):
        assert k in res
    assert res["AR@10"] == 1.0 and res["AR@100"] == 1.0
    assert res["n_objects"] == 3  # the difficult dog is ignored
    # with 1 proposal per image: 000001's far box misses, 000002 found -> 1/3
    code, out, _ = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(pf),
                        "--counts", "1,2"], capsys)
    assert json.loads(out.strip().splitlines()[-1])["AR@1"] == pytest.approx(1 / 3)
    code, out, _ = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(pf), "--no-sizes"],
                       capsys)
    fast = json.loads(out.strip().splitlines()[-1])
    assert fast["AR@10"] == 1.0 and "AR_S@100" not in fast
    # --max-images 1: only 000001 is the ground truth (its 2 objects), 000002's proposal is left out, not an error
    code, out, err = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(pf),
                          "--max-images", "1", "--counts", "1,2"], capsys)
    assert code == 0, err
    first = json.loads(out.strip().splitlines()[-1])
    assert (first["n_images"], first["n_objects"]) == (1, 2)
    assert first["AR@1"] == 0.0 and first["AR@2"] == pytest.approx(0.5)  # the far box first, then one of two
    code, _, err = run(["proposals", "--coco", str(pf), "--proposals", str(pf), "--max-images", "1"], capsys)
    assert code == 2 and "--max-images takes N >= 1 and needs --voc" in err
    # segm on VOC: no masks
    code, _, err = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(pf),
                        "--iou-type", "segm"], capsys)
    assert code == 2 and "no instance masks" in err
    # missing file, bad entry, missing --split, bad COCO file
    code, _, err = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(tmp_path / "x.json")],
                       capsys)
    assert code == 2 and "x.json" in err and "not found" in err
    pf.write_text(json.dumps([{"image_id": "000001", "bbox": [1, 2], "score": 1}]))
    code, _, err = run(["proposals", "--voc", str(voc), "--split", "val", "--proposals", str(pf)], capsys)
    assert code == 2 and "props.json: entry 0: bbox" in err
    code, _, err = run(["proposals", "--voc", str(voc), "--proposals", str(pf)], capsys)
    assert code == 2 and "--split" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(["proposals", "--coco", str(bad), "--proposals", str(pf)], capsys)
    assert code == 2 and "bad.json" in err


def test_module_entry_point(tmp_path):
    """`python -m pipelines.evaluate` itself: JSON on the last stdout line; a bad folder -> exit 2, one line."""
    voc = make_voc(tmp_path)
    write_results(tmp_path / "res", "val", {}, VOC_CLASSES)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "pipelines.evaluate", "detections", "--voc", str(voc), "--split", "val",
                        "--results", str(tmp_path / "res")], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["mAP"] == 0.0
    p = subprocess.run([sys.executable, "-m", "pipelines.evaluate", "detections", "--voc", str(tmp_path / "no"),
                        "--split", "val", "--results", str(tmp_path / "res")], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
