"""`python -m pipelines.propose` end to end on a tiny VOC-layout folder: store, resume, COCO export, errors."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from core.store import ProposalStore
from pipelines.propose import main

IDS = ["img_a", "img_b", "img_c"]
XML = """<annotation><filename>{id}.jpg</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>
</size><object><name>dog</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>
<ymax>{y2}</ymax></bndbox></object></annotation>"""


def _image(seed, h=100, w=120):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (90, 120, 90), np.float64) + rng.normal(0, 6, (h, w, 3))
    x1, y1 = rng.integers(5, 30, 2)
    img[y1:y1 + 50, x1:x1 + 60] = rng.integers(0, 255, 3)
    img[5:30, 90:115] = (30, 40, 200)
    return np.clip(img, 0, 255).astype(np.uint8), (x1, y1, x1 + 60, y1 + 50)


@pytest.fixture()
def voc(tmp_path):
    root = tmp_path / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for k, i in enumerate(IDS):
        img, (x1, y1, x2, y2) = _image(k)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        (root / "Annotations" / f"{i}.xml").write_text(
            XML.format(id=i, w=img.shape[1], h=img.shape[0], x1=x1 + 1, y1=y1 + 1, x2=x2, y2=y2))
    (root / "ImageSets/Main/val.txt").write_text("\n".join(IDS) + "\n")
    return root


def _run(*args):
    """main() as `run_main` runs it: UserError -> 'error: ...' + exit 2."""
    from core.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(main, [*map(str, args), "--no-progress"])
    return e.value.code


def _mtimes(store):
    return {p.name: p.stat().st_mtime_ns for p in (store / "images").iterdir()}


def test_propose_resume_export(voc, tmp_path, caplog):
    store = tmp_path / "ss_val"
    res = tmp_path / "res.json"
    args = ["--voc", voc, "--split", "val", "--out", store, "--top", 50, "--set", "ss.seed=3"]
    assert _run(*args, "--export-coco", res) == 0
    st = ProposalStore.open(store)
    assert st.meta["complete"] and st.image_ids == IDS and st.method == "selective_search"
    assert st.meta["params"]["ss"]["top_n"] == 50 and st.meta["params"]["ss"]["seed"] == 3
    assert (store / "config.yaml").is_file() and "top_n: 50" in (store / "config.yaml").read_text()
    for i in IDS:
        p = st.get(i)
        assert 0 < len(p) <= 50 and p.masks is None
        assert (np.diff(p.scores) < 0).all()
        top = st.get(i, top=5)  # top-N reads return the first N
        assert np.array_equal(top.boxes, p.boxes[:5]) and np.array_equal(top.scores, p.scores[:5])
    # the store holds exactly what the proposer returns for the image (same seed)
    from core.config import Config, SSConfig
    from core.images import load_image
    from proposals import build_proposer

    prop = build_proposer("selective_search", Config(ss=SSConfig(top_n=50, seed=3)))
    boxes, scores, _ = prop(load_image(voc / "JPEGImages" / "img_b.jpg"))
    assert np.array_equal(st.get("img_b").boxes, boxes) and np.array_equal(st.get("img_b").scores, scores)

    results = json.loads(res.read_text())
    assert len(results) == sum(len(st.get(i)) for i in IDS)
    r0 = results[0]
    assert set(r0) == {"image_id", "bbox", "score"} and r0["image_id"] == "img_a"
    b = st.get("img_a").boxes[0]
    assert np.allclose(r0["bbox"], [b[0], b[1], b[2] - b[0], b[3] - b[1]])

    # resume: a second run recomputes nothing
    before = _mtimes(store)
    caplog.set_level(logging.INFO, logger="proposals.extract")
    assert _run(*args, "--workers", 2) == 0
    assert _mtimes(store) == before
    assert "all 3 images already have proposals" in caplog.text

    # other settings into the same store: a clear error, not a silent mix
    assert _run("--voc", voc, "--split", "val", "--out", store, "--top", 20) == 2


def test_corrupt_image_keeps_finished_work(voc, tmp_path, capsys):
    store = tmp_path / "st"
    bad = voc / "JPEGImages" / "img_b.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])  # truncated JPEG
    assert _run("--voc", voc, "--split", "val", "--out", store, "--workers", 2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "img_b.jpg" in err and "Traceback" not in err
    st = ProposalStore.open(store, require_complete=False)
    assert st.done("img_a") and st.done("img_c") and not st.done("img_b")
    before = _mtimes(store)
    bad.write_bytes(good)
    assert _run("--voc", voc, "--split", "val", "--out", store) == 0
    after = _mtimes(store)
    assert {k: v for k, v in after.items() if k in before} == before and "img_b.npz" in after
    assert ProposalStore.open(store).meta["complete"]


def test_shard_max_images_and_errors(voc, tmp_path, capsys):
    assert _run("--voc", voc, "--split", "val", "--out", tmp_path / "s1", "--shard", "1/2") == 0
    assert ProposalStore.open(tmp_path / "s1").image_ids == ["img_b"]
    assert _run("--voc", voc, "--split", "val", "--out", tmp_path / "m2", "--max-images", 2,
                "--ss-backend", "opencv") == 0
    st = ProposalStore.open(tmp_path / "m2")
    assert st.image_ids == IDS[:2] and st.meta["params"]["ss"]["backend"] == "opencv"
    capsys.readouterr()
    assert _run("--voc", voc, "--split", "nope", "--out", tmp_path / "x") == 2
    assert "nope.txt" in capsys.readouterr().err
    assert _run("--voc", voc, "--split", "val", "--out", tmp_path / "x", "--shard", "2/2") == 2
    assert _run("--voc", voc, "--split", "val", "--out", tmp_path / "x", "--method", "deepmask") == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert _run("--voc", voc, "--split", "val", "--out", tmp_path / "x", "--set", "ss.backend=matlab") == 2
    assert "ss.backend" in capsys.readouterr().err


def test_deepmask_store_identity_is_checkpoint_and_inference_settings():
    """`pipelines.propose --config X` and `pipelines.run` must agree on a DeepMask store's identity whenever they
    compute the same proposals: training-only settings and speed knobs do not count, inference settings do."""
    import dataclasses

    from core.config import load_config
    from proposals import proposer_params

    cfg = load_config(None, [])
    base = proposer_params("deepmask", cfg, "ck.pt")
    same = [("iters", 7), ("lr", 0.5), ("train_sets", []), ("workers", 9), ("scale_batch", True), ("chunk", 3),
            ("batch_size", 4)]
    for key, value in same:
        other = dataclasses.replace(cfg, deepmask=dataclasses.replace(cfg.deepmask, **{key: value}))
        assert proposer_params("deepmask", other, "ck.pt") == base, key
    for key, value in [("mask_threshold", 0.35), ("top_n", 5), ("object_range", [40.0, 300.0]), ("infer_dtype", "bfloat16")]:
        other = dataclasses.replace(cfg, deepmask=dataclasses.replace(cfg.deepmask, **{key: value}))
        assert proposer_params("deepmask", other, "ck.pt") != base, key
    assert proposer_params("deepmask", cfg, "other.pt") != base


def test_random_proposer_is_a_deterministic_baseline(voc, tmp_path):
    """`--method random`: top_n boxes inside each image, ranked scores, the same boxes for the same image and seed
    (a resumed or repeated run gives the same store), other boxes for another seed or image."""
    import dataclasses

    from core.config import load_config
    from proposals import build_proposer

    cfg = load_config(None, ["random.top_n=300"])
    img, _ = _image(3)
    b1, s1, m1 = build_proposer("random", cfg)(img)
    b2, _, _ = build_proposer("random", cfg)(img.copy())
    assert b1.shape == (300, 4) and b1.dtype == np.float32 and m1 is None
    np.testing.assert_array_equal(b1, b2)
    assert np.all(b1[:, :2] >= 0) and np.all(b1[:, 2] <= img.shape[1]) and np.all(b1[:, 3] <= img.shape[0])
    assert np.all(b1[:, 2:] > b1[:, :2]) and np.all(np.diff(s1) < 0)
    other = dataclasses.replace(cfg, random=dataclasses.replace(cfg.random, seed=1))
    assert not np.array_equal(build_proposer("random", other)(img)[0], b1)
    assert not np.array_equal(build_proposer("random", cfg)(_image(4)[0])[0], b1)
    out = tmp_path / "rnd"
    assert _run("--method", "random", "--voc", voc, "--split", "val", "--top", 50, "--out", out) == 0
    store = ProposalStore.open(out)
    assert store.method == "random" and store.image_ids == IDS
    assert all(len(store.get(i).boxes) == 50 for i in IDS)


def test_dataset_from_the_config(voc, tmp_path, capsys):
    """Without --voc/--coco the config's data.voc is used (so `--config CFG --split S` suffices); with neither, a
    one-line error."""
    out = tmp_path / "from_cfg"
    assert _run("--split", "val", "--set", f"data.voc={voc}", "--top", 20, "--out", out) == 0
    assert ProposalStore.open(out).image_ids == IDS
    assert _run("--split", "val", "--out", tmp_path / "none") == 2
    assert "no dataset" in capsys.readouterr().err.strip().splitlines()[-1]
