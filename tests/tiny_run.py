"""The tiny run of the whole experiment (configs/shapes.yaml made tiny) and a fingerprint of what it produced.

``TINY`` exercises the machinery, not the accuracy: tiny data, random-init small trunks, a few iterations.
:func:`fingerprint` reduces a finished run folder to what must not move when code is reorganised: the proposals
of every store (boxes, scores, masks), the weights of every trained model, the training curves without their
timings, and the sweep's mAP per method, N and seed.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes.yaml"

TINY = [
    "deepmask.trunk=small", "deepmask.pretrained=", "detector.trunk=small", "detector.pretrained=",
    "data.synthetic_trainval=6", "data.synthetic_test=4", "data.synthetic_size=128",
    "deepmask.iters=4", "deepmask.batch_size=8", "deepmask.val_every=2", "deepmask.val_batches=1",
    "deepmask.checkpoint_every=2", "deepmask.workers=0", "deepmask.top_n=150", "deepmask.object_range=[22.63,128]",
    "ss.workers=1", "ss.top_n=150",
    "detector.iters=4", "detector.checkpoint_every=2", "detector.lr_steps=[3]", "detector.workers=0",
    "detector.scales=[128]", "detector.test_scale=128", "sweep.counts=[10,100]", "sweep.seeds=[0,1]",
    "sweep.retrain_counts=[10]",
    # float32 inference everywhere: 'auto' would pick bfloat16 on some CPUs and float32 on others
    "deepmask.infer_dtype=float32", "detector.test_dtype=float32",
]
METHODS = ("deepmask", "selective_search", "random")

# history keys that are wall-clock measurements, not results
TIMING_KEYS = ("images_per_s",)


def tiny_overrides(out_dir, name: str = "tiny", data=None) -> list[str]:
    """TINY, the run folder ``out_dir/name`` and, when given, the synthetic set already made at ``data`` (the same
    generator parameters give the same bytes, so the run's outputs do not depend on where its data lies)."""
    return TINY + [f"out_dir={out_dir}", f"name={name}"] + ([f"data.synthetic_root={data}"] if data else [])


def make_tiny_data(root) -> Path:
    """The synthetic set of TINY (what pipelines.run would generate for it) at ``root``."""
    from core.synthetic import generate

    generate(root, trainval=6, test=4, size=128, seed=0, workers=1, progress=False)
    return Path(root)


def versions() -> dict:
    """The libraries whose kernels the numbers depend on, and the CPU's vector and bfloat16 matrix units (AMX,
    AVX512-BF16 and AVX512 kernels round differently: the same commit pins other proposals on each; a CPU without
    AVX512, such as an AMD EPYC Zen 3, runs the AVX2 kernels), since numbers move across both."""
    import cv2
    import scipy
    import skimage
    import torch

    from core.precision import cpu_flags

    return {"torch": torch.__version__, "numpy": np.__version__, "cv2": cv2.__version__, "scipy": scipy.__version__,
            "skimage": skimage.__version__, "machine": platform.machine(),
            "cpu_units": sorted({"amx_bf16", "avx512_bf16", "avx512f"} & cpu_flags())}


def _sha(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:16]


def store_digest(path) -> str:
    from core.store import ProposalStore

    store = ProposalStore.open(path)
    h = hashlib.sha1()
    for i in store.image_ids:
        p = store.get(i, masks=True)
        h.update(str(i).encode() + b"\0")
        h.update(np.ascontiguousarray(p.boxes, np.float32).tobytes())
        h.update(np.ascontiguousarray(p.scores, np.float32).tobytes())
        for r in p.masks or []:
            h.update(r["counts"].encode())
    return _sha(h)


def weights_digest(ckpt_path) -> str:
    """SHA-1 of a checkpoint's model state dict (names and bytes, in key order)."""
    from core.io import load_checkpoint

    h = hashlib.sha1()
    for k, v in load_checkpoint(ckpt_path)["model"].items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().cpu().numpy()).tobytes())
    return _sha(h)


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def fingerprint(run) -> dict:
    """What a finished tiny run produced, as plain JSON-able values (see the module docstring)."""
    run = Path(run)
    out: dict = {"stores": {}, "weights": {}, "curves": {}, "mAP": {}}
    for d in sorted((run / "proposals").iterdir()):
        out["stores"][d.name] = store_digest(d)
    for name in ("best.pt", "last.pt"):
        out["weights"][f"deepmask/{name}"] = weights_digest(run / "deepmask" / name)
    out["curves"]["deepmask"] = json.loads((run / "deepmask" / "metrics.json").read_text())
    for d in sorted(run.glob("detector_*")):
        out["weights"][f"{d.name}/final.pt"] = weights_digest(d / "final.pt")
        out["curves"][d.name] = _untimed(json.loads((d / "history.json").read_text()))
    for m in sorted((run / "results").glob("*/top*/metrics.json")):
        out["mAP"][f"{m.parent.parent.name}/{m.parent.name}"] = json.loads(m.read_text())["mAP"]
    sweep = json.loads((run / "sweep.json").read_text())
    out["sweep_rows"] = [{k: r[k] for k in ("method", "N", "seed", "mAP", "protocol", "train_N") if k in r}
                         for r in sweep["seed_rows"]]
    out["recall"] = sweep["recall"]
    out["low_threshold"] = low_threshold_detections(run)
    return out


def low_threshold_detections(run) -> dict:
    """The tiny detectors, a few iterations old, score nothing above the test threshold (0.05), so the sweep's mAP
    is 0 everywhere. Tested again with no threshold, every detector gives detections to compare: per detector and
    N, the mAP and a digest of detections.json; and the detections of one in-memory image (pipelines.detect's
    path) with the proposal index of each."""
    import dataclasses

    from core.config import load_config
    from core.datasets import VOCDataset

    run = Path(run)
    cfg = load_config(str(run / "config.yaml"))
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, score_thresh=0.0))
    test_ds = VOCDataset(cfg.data.voc, cfg.data.test_split)
    import torch

    out: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as it was pinned: the summation order of 2 threads moves the last bits
    try:
        _low_threshold(run, cfg, test_ds, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _low_threshold(run, cfg, test_ds, out: dict) -> None:
    import tempfile

    from detector.test import test_detector

    for d in sorted(run.glob("detector_*")):
        method = next(m for m in METHODS if d.name.removeprefix("detector_").startswith(m))
        store = run / "proposals" / f"{method}_{test_ds.split}"
        with tempfile.TemporaryDirectory() as res_dir:  # the run folder is left as it is
            res = test_detector(d / "final.pt", store, test_ds, tops=[10, 100], out_dir=res_dir, cfg=cfg,
                                progress=False)
            for n in (10, 100):
                text = (Path(res_dir) / f"top{n}" / "detections.json").read_bytes()
                out[f"{d.name}/top{n}"] = {"mAP": res[n]["mAP"], "num_detections": res[n]["num_detections"],
                                          "detections": hashlib.sha1(text).hexdigest()[:16]}
    out["predict"] = _predict_digest(run, cfg, test_ds)


def _predict_digest(run, cfg, test_ds) -> dict:
    from core.images import load_image
    from core.store import ProposalStore
    from detector.predict import predict
    from detector.model import load_detector

    model, _ = load_detector(run / "detector_deepmask" / "final.pt")
    rec = test_ds.get(test_ds.image_ids[0])
    props = ProposalStore.open(run / "proposals" / f"deepmask_{test_ds.split}").get(rec.image_id, masks=False).boxes
    det = predict(model, load_image(rec.path), props, cfg.detector)
    h = hashlib.sha1()
    for k in ("boxes", "scores", "labels", "proposal"):
        h.update(np.ascontiguousarray(det[k]).tobytes())
    return {"detections": len(det["scores"]), "digest": _sha(h)}


def run_tiny(out_dir, name: str = "tiny", data=None, progress: bool = False):
    """The tiny experiment in this process (one thread, as the numbers were pinned); returns the run folder."""
    import torch

    from core.config import load_config
    from pipelines.experiment import run_experiment

    cfg = load_config(str(SHAPES), tiny_overrides(out_dir, name, data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(cfg, progress=progress)
    finally:
        torch.set_num_threads(threads)
    return Path(out_dir) / name


if __name__ == "__main__":  # record: python tests/tiny_run.py PINS.json (adds or replaces this machine's pin)
    import sys
    import tempfile

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        pin = {"versions": versions(), "fingerprint": fingerprint(run_tiny(Path(tmp) / "runs"))}
    out = Path(sys.argv[1])
    pins = json.loads(out.read_text())["pins"] if out.is_file() else []
    pins = [p for p in pins if p["versions"] != pin["versions"]] + [pin]
    out.write_text(json.dumps({"pins": pins}, indent=1) + "\n")
