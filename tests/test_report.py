"""The run's HTML report (pipelines.report), written by pipelines.run as its last stage: its data says what the run's
stores and sweep say, and the page renders in a headless browser without script errors, with its figures and an
image with proposals drawn."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from core.config import load_config
from core.datasets import VOCDataset
from core.store import ProposalStore


def _js_doc(path, prefix, suffix=";"):
    text = path.read_text().strip()
    assert text.startswith(prefix) and text.endswith(suffix), path
    return json.loads(text[len(prefix):-len(suffix)].rstrip(")"))


def test_report_data_matches_the_run(tiny_run):
    rep = tiny_run / "report"
    assert (rep / "index.html").is_file()
    doc = _js_doc(rep / "data" / "index.js", "REPORT = ")
    cfg = load_config(str(tiny_run / "config.yaml"))
    test_ds = VOCDataset(cfg.data.voc, cfg.data.test_split, max_images=cfg.data.test_images)
    sweep = json.loads((tiny_run / "sweep.json").read_text())
    assert doc["methods"] == list(cfg.sweep.methods)
    assert [r["mAP"] for r in doc["tables"]["rows"]] == [r["mAP"] for r in sweep["rows"]]
    assert set(doc["figures"]) == {"figure5.png", "recall.png", "recall_iou.png"}
    assert all((rep / "fig" / f).stat().st_size > 1000 for f in doc["figures"])
    assert {s["stage"] for s in doc["tables"]["stages"]} >= {"train_deepmask", "sweep"}
    assert [im["id"] for im in doc["images"]] == list(test_ds.image_ids)
    k = doc["top_k"]
    for im in doc["images"]:
        item = _js_doc(rep / "data" / f"img_{im['i']}.js", "REPORT_IMAGE(", ");")
        rec = test_ds.get(im["id"])
        assert np.allclose([g[:4] for g in item["gt"]], rec.boxes, atol=0.06)
        for m in doc["methods"]:
            store = ProposalStore.open(tiny_run / "proposals" / f"{m}_{cfg.data.test_split}")
            want = store.get(im["id"], top=k, masks=False).boxes
            assert np.allclose(item["proposals"][m], want, atol=0.06), (m, im["id"])
        assert item["masks"] == "deepmask" and (rep / "mask" / f"{im['i']}.png").stat().st_size > 0
        assert (rep / "img" / f"{im['i']}.jpg").is_file() and (rep / "thumb" / f"{im['i']}.jpg").is_file()
    # the gallery: objects whose best IoU with the top-100 proposals is below .5, each with its crop
    for m, items in doc["gallery"].items():
        store = ProposalStore.open(tiny_run / "proposals" / f"{m}_{cfg.data.test_split}")
        for g in items:
            assert (rep / "miss" / g["file"]).is_file()
            iid = doc["images"][g["i"]]["id"]
            gt = test_ds.get(iid).boxes[g["gt"]]
            b = store.get(iid, top=doc["miss"]["top"], masks=False).boxes
            ix = np.clip(np.minimum(b[:, 2:], gt[2:]) - np.maximum(b[:, :2], gt[:2]), 0, None).prod(1)
            iou = ix / ((b[:, 2:] - b[:, :2]).prod(1) + (gt[2:] - gt[:2]).prod() - ix)
            assert iou.max() < 0.5 and g["iou"] == pytest.approx(iou.max(), abs=2e-3)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_report_renders_in_a_headless_browser(tiny_run, tmp_path):
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=15000", "--dump-dom", (tiny_run / "report" / "index.html").as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", p.stdout)
    assert body, p.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert attrs.get("data-errors") == "0" and not console, (attrs, console, p.stderr[-2000:])
    assert attrs.get("data-ready") == "1", attrs
    assert int(attrs["data-drawn-proposals"]) > 0
    for fig in ("figure5.png", "recall.png", "recall_iou.png"):
        assert f'src="fig/{fig}"' in p.stdout
    assert p.stdout.count('src="thumb/') == len(json.loads(
        (tiny_run / "report" / "data" / "index.js").read_text().strip()[len("REPORT = "):-1])["images"])
    # the tables were filled from the data: a Figure 5 row per method and protocol
    assert p.stdout.count("<tr>") > 10


def test_report_command_rebuilds_a_run_s_report(tiny_run, tmp_path, capsys):
    """python -m pipelines.report --run RUN --images 2 on a copy of the tiny run: the viewer holds the first two
    test images, the --set value is used, and the old report is replaced whole."""
    from pipelines.report import main

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    assert main(["--run", str(run), "--images", "2", "--set", "report.top_k=5"]) == 0
    assert capsys.readouterr().out.strip().endswith("index.html")
    doc = _js_doc(run / "report" / "data" / "index.js", "REPORT = ")
    assert [im["i"] for im in doc["images"]] == [0, 1] and doc["top_k"] == 5
    assert sorted(p.name for p in (run / "report" / "data").glob("img_*.js")) == ["img_0.js", "img_1.js"]
    item = _js_doc(run / "report" / "data" / "img_0.js", "REPORT_IMAGE(", ");")
    assert all(len(v) <= 5 for v in item["proposals"].values())
    from core.errors import DataError

    with pytest.raises(DataError, match="not a run folder"):
        main(["--run", str(tmp_path / "nothing")])
