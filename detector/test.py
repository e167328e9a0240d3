"""Fast R-CNN inference and VOC07 evaluation (fast-rcnn ``lib/fast_rcnn/test.py``; thresholds of py-faster-rcnn).

Per image: the trunk runs once at the test scale (shorter side ``test_scale``, longer at most ``max_size``); the
RoI head runs once, batched, on the top ``max(tops)`` proposals; class scores are the softmax, boxes the
class-specific regressed boxes clipped to the image. Since the head treats every RoI independently (no dropout at
test), the outputs for the first N proposals are the first N rows, so one pass serves every N in ``tops``:
for each N, detections with score > ``score_thresh`` (0.05) per class, per-class NMS at ``test_nms`` (0.3)
(torchvision.ops.batched_nms), at most ``max_dets`` (100) per image (py-faster-rcnn ``test_net``).

The official Fast R-CNN code also removes RoIs that map to the same feature-map cell (DEDUP_BOXES = 1/16) to save
time; we do not (it would change nothing but speed, and would complicate the slicing by N).

Outputs per N in ``out_dir/top<N>/``: the devkit's ``comp4_det_<split>_<class>.txt`` (detector/voc_results.py's
writer), ``detections.json`` (COCO-style: image_id, category_id = class index + 1, category, bbox [x,y,w,h] in
0-based pixels, score) and ``metrics.json``; plus ``out_dir/results.json`` with every N.

Sharded testing (core/distributed.py): ``shard=(I, N)`` detects only images I, I+N, ... (the split of
``DistributedSampler(shuffle=False)``, padded to equal shards) and writes their detections, exactly, to
``out_dir/shards/detections-I-of-N.json`` without evaluating; :func:`evaluate_shards` merges the shards per image
(a padded duplicate keeps its first copy), puts the images back in the split's order and evaluates -- the same files
and numbers as one process. Under ``torchrun`` every rank takes its shard, rank 0 merges and evaluates (the shard
files are removed), and every rank returns the results.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchvision.ops import batched_nms
from tqdm import tqdm

from core import distributed
from core.boxes import clip_boxes
from core.errors import ConfigError, DataError, UserError, is_out_of_memory
from core.images import load_image
from core.io import read_json, write_json
from core.precision import resolve_dtype
from core.training import make_loader

from . import voc_eval, voc_results
from .model import DetectorCheckpoint, FastRCNN
from .transforms import compute_scale, resize_image, to_tensor

log = logging.getLogger(__name__)

HEAD_CHUNK = 1024  # RoIs per head call (bounds memory: 1024 x 25088 floats for VGG16 pool5)


class Detections(NamedTuple):
    boxes: torch.Tensor  # (D,4) in original image pixels
    scores: torch.Tensor  # (D,)
    labels: torch.Tensor  # (D,) 0-based object classes
    proposals: torch.Tensor  # (D,) index of the proposal each detection was regressed from


def postprocess(scores: torch.Tensor, boxes: torch.Tensor, score_thresh: float = 0.05, nms_thresh: float = 0.3,
                max_dets: int = 100) -> Detections:
    """Per-class thresholding + NMS + per-image cap.

    ``scores`` (R,K+1) softmax (column 0 = background), ``boxes`` (R,K+1,4). Returns the detections sorted by score
    (descending)."""
    s = scores[:, 1:]
    keep = torch.nonzero(s > score_thresh)
    if keep.numel() == 0:
        none = torch.zeros(0, dtype=torch.long)
        return Detections(boxes.new_zeros((0, 4)), scores.new_zeros(0), none, none.clone())
    r, c = keep[:, 0], keep[:, 1]
    b = boxes[r, c + 1]
    sc = s[r, c]
    k = batched_nms(b, sc, c, nms_thresh)  # sorted by decreasing score
    if max_dets > 0:
        k = k[:max_dets]
    return Detections(b[k], sc[k], c[k], r[k])


class _TestImages(Dataset):
    """Decode + resize in DataLoader workers; proposals read with the image."""

    def __init__(self, dataset, store, top: int, test_scale: int, max_size: int, mean, std):
        self.ids = list(dataset.image_ids)
        self.dataset = dataset
        self.store = store
        self.top = top
        self.test_scale, self.max_size = test_scale, max_size
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        iid = self.ids[i]
        rec = self.dataset.get(iid)
        image = load_image(rec.path)
        h, w = image.shape[:2]
        scale = compute_scale(h, w, self.test_scale, self.max_size)
        img = to_tensor(resize_image(image, scale), self.mean, self.std)
        props = self.store.get(iid, top=self.top, masks=False).boxes
        return {"image_id": iid, "image": img, "scale": scale, "height": h, "width": w,
                "proposals": torch.from_numpy(np.ascontiguousarray(props, dtype=np.float32)).reshape(-1, 4)}


def _first(batch):
    return batch[0]


@torch.inference_mode()
def detect_image(model: FastRCNN, image: torch.Tensor, proposals: torch.Tensor, scale: float, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Scores (R,K+1) and clipped class-specific boxes (R,K+1,4) in original image pixels for every proposal
    (fast-rcnn ``im_detect``). ``image`` is the normalised, rescaled (3,H,W) tensor."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    R = proposals.shape[0]
    K1 = model.num_classes + 1
    if R == 0:
        return torch.zeros((0, K1)), torch.zeros((0, K1, 4)), {"trunk": 0.0, "head": 0.0}
    feats = model.features(image[None].to(device))
    t1 = time.perf_counter()
    props = proposals.to(device)
    rois = torch.cat([props.new_zeros((R, 1)), props * scale], dim=1)
    logits, deltas = [], []
    for s in range(0, R, HEAD_CHUNK):
        lg, dl = model.head(feats, rois[s:s + HEAD_CHUNK])
        logits.append(lg)
        deltas.append(dl)
    scores = torch.softmax(torch.cat(logits).float(), dim=1)
    deltas = torch.cat(deltas).float().view(R, K1, 4)
    # targets are scale-invariant, so decoding against the proposals in original pixels equals the official
    # decode in rescaled pixels followed by division by the scale
    boxes = clip_boxes(model.box_coder.decode(props.float(), deltas), height, width)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return scores.cpu(), boxes.cpu(), {"trunk": t1 - t0, "head": t2 - t1}


def _load_model(model_or_ckpt, device):
    if isinstance(model_or_ckpt, FastRCNN):
        return model_or_ckpt, None
    ck = DetectorCheckpoint.of(model_or_ckpt)
    return ck.build(device), ck


def _test_model(model_or_ckpt, cfg, dataset, device):
    """(model in eval mode, config) for testing on ``dataset``: the classes must match; with ``detector.svd`` a
    copy whose fc6/fc7 are truncated."""
    model, ckpt = _load_model(model_or_ckpt, device)
    if cfg is None:
        if ckpt is None:
            raise ConfigError("test_detector: pass cfg when giving a model object")
        cfg = ckpt.config()
    dcfg = cfg.detector
    if model.num_classes != len(dataset.classes):
        raise DataError(f"the detector has {model.num_classes} classes but dataset {dataset.name} has "
                        f"{len(dataset.classes)}")
    if ckpt is not None and ckpt.classes != list(dataset.classes):
        raise DataError(f"{ckpt.source}: the detector was trained on classes {ckpt.classes}, the dataset has "
                        f"{dataset.classes}")
    if dcfg.svd:
        model = copy.deepcopy(model)
        model.apply_svd(dcfg.svd_fc6_rank, dcfg.svd_fc7_rank)
        log.info("fc6/fc7 replaced by truncated SVD (ranks %d / %d)", dcfg.svd_fc6_rank, dcfg.svd_fc7_rank)
    dtype, name = resolve_dtype(dcfg.test_dtype, next(model.parameters()).device, "detector.test_dtype", int8=True)
    log.info("testing with a folded trunk and the RoI head in %s%s", name,
             " (test_dtype auto)" if dcfg.test_dtype == "auto" else "")
    return model.for_inference(dtype), cfg


def _merge_rank_shards(out_dir, world: int, dataset, store) -> dict:
    """Under torchrun, once every rank wrote its shard: rank 0 evaluates them as one run and removes them; every
    rank returns the results."""
    distributed.barrier()
    results = None
    if distributed.is_main():
        files = [shard_path(out_dir, (r, world)) for r in range(world)]
        results = evaluate_shards(files, dataset, out_dir, store=store)
        for f in files:
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            files[0].parent.rmdir()
    return distributed.broadcast_object(results)


def present_classes(dataset) -> list[str]:
    """Classes with at least one non-difficult ground-truth object in the split (VOC07 AP is defined for them)."""
    counts = np.zeros(len(dataset.classes), np.int64)
    for rec in dataset:
        lab = np.asarray(rec.labels, np.int64)[~np.asarray(rec.difficult, bool)]
        counts += np.bincount(lab, minlength=len(dataset.classes))
    return [c for c, n in zip(dataset.classes, counts) if n > 0]


def test_detector(model_or_ckpt, store, dataset, tops: list[int], out_dir, cfg=None, device: str | None = None,
                  progress: bool = True, shard: tuple[int, int] | None = None) -> dict:
    """Detect on every image of ``dataset`` with the top N proposals of ``store`` for each N in ``tops``, in ONE
    pass over the images; write the result files per N and return {N: {'mAP', 'ap', 'mAP_all', ...}}.

    ``model_or_ckpt``: a FastRCNN, a DetectorCheckpoint, a checkpoint dict or a path. ``store``: a ProposalStore or
    its path (checked against the dataset and split). ``cfg``: a Config whose ``detector`` test fields (test_scale,
    max_size, score_thresh, test_nms, max_dets, svd*) are used; default: the checkpoint's config. The box decoding
    is the model's own (its ``box_coder``, from the stds it was trained with).
    'mAP' averages the AP over the classes that have (non-difficult) ground truth in the split (all 20 on VOC; the
    synthetic set uses 6 of the 20 VOC names); 'mAP_all' over all classes (absent ones count 0).
    ``shard=(I, N)``: only this shard's detections, written to ``out_dir/shards`` (module docstring); returns
    {'shard': path, 'images': count}. Under torchrun the ranks are the shards (see the module docstring)."""
    from core.store import ProposalStore

    tops = sorted({int(t) for t in tops})
    if not tops or tops[0] <= 0:
        raise ConfigError(f"--top: proposal counts must be positive integers, got {tops}")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ConfigError(f"shard {shard[0]}/{shard[1]}: need 0 <= I < N")
    ranks = shard is None and distributed.init()  # under torchrun: one shard per rank
    if ranks:
        shard = (distributed.rank(), distributed.world_size())
    progress = progress and (shard is None or not ranks or distributed.is_main())
    device = str(distributed.device(device or (cfg.device if cfg is not None else "cpu")))
    model, cfg = _test_model(model_or_ckpt, cfg, dataset, device)
    dcfg = cfg.detector
    store = ProposalStore.open(store) if isinstance(store, (str, Path)) else store
    store.check(dataset.name, dataset.split)
    out_dir = Path(out_dir)
    max_top = tops[-1]

    data = _TestImages(dataset, store, max_top, dcfg.test_scale, dcfg.max_size, model.mean, model.std)
    sampler = None if shard is None else DistributedSampler(data, num_replicas=shard[1], rank=shard[0], shuffle=False)
    loader = make_loader(data, min(dcfg.workers, len(data)), 0, batch_size=1, sampler=sampler, collate_fn=_first)
    per_top = {n: {} for n in tops}  # N -> {image_id: (boxes, scores, labels)}
    n_props = {n: 0 for n in tops}
    num_proposals = {}  # image_id -> proposals used (shards)
    timing = {"trunk": 0.0, "head": 0.0, "post": 0.0}
    t_start = time.time()
    empty = 0
    for item in tqdm(loader, total=len(loader), desc="test fast-rcnn", unit="img", disable=not progress):
        props = item["proposals"]
        num_proposals[item["image_id"]] = int(props.shape[0])
        if props.shape[0] == 0:
            empty += 1
        try:
            scores, boxes, t = detect_image(model, item["image"], props, item["scale"], item["height"],
                                            item["width"])
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise UserError(f"image {item['image_id']} ({item['width']}x{item['height']} px, tested at "
                            f"{item['image'].shape[2]}x{item['image'].shape[1]}, {props.shape[0]} proposals): out of "
                            f"memory ({type(e).__name__}); lower detector.max_size (now {dcfg.max_size}) or "
                            f"detector.test_scale (now {dcfg.test_scale}), or test fewer proposals (--top)") from None
        t0 = time.perf_counter()
        for n in tops:
            d = postprocess(scores[:n], boxes[:n], dcfg.score_thresh, dcfg.test_nms, dcfg.max_dets)
            per_top[n][item["image_id"]] = (d.boxes.numpy(), d.scores.numpy(), d.labels.numpy())
            n_props[n] += min(n, props.shape[0])
        timing["trunk"] += t["trunk"]
        timing["head"] += t["head"]
        timing["post"] += time.perf_counter() - t0
    wall = time.time() - t_start
    if shard is not None:
        path = _write_shard(out_dir, shard, tops, dataset, store, per_top, num_proposals, timing, wall)
        if not ranks:  # an independent job (--shard I/N): merge later with evaluate_shards
            return {"shard": str(path), "images": len(num_proposals)}
        return _merge_rank_shards(out_dir, shard[1], dataset, store)
    return _evaluate(dataset, store, tops, out_dir, per_top, n_props, timing, wall, len(data), empty)


def _evaluate(dataset, store, tops, out_dir, per_top, n_props, timing, wall, num_images, empty) -> dict:
    """Evaluate the detections ``per_top`` (N -> {image_id: (boxes, scores, labels)}) and write the result files."""
    out_dir = Path(out_dir)
    if empty:
        log.warning("%d images have no proposals (no detections for them)", empty)
    n_img = max(1, num_images)
    log.info("tested %d images in %.1f s (%.3f s/img: trunk %.3f, head %.3f, post %.3f)", num_images, wall,
             wall / n_img, timing["trunk"] / n_img, timing["head"] / n_img, timing["post"] / n_img)

    present = present_classes(dataset)
    absent = [c for c in dataset.classes if c not in present]
    if absent:
        log.info("%d classes have no ground truth in split '%s' (AP 0, left out of 'mAP'): %s", len(absent),
                 dataset.split, ", ".join(absent))
    quiet = _DropAbsentClassWarnings()
    results = {}
    for n in tops:
        dets = voc_eval.detections_by_class(per_top[n], dataset.classes)
        d = out_dir / f"top{n}"
        voc_results.write_results(d, dataset.split, dets, dataset.classes)
        write_json(d / "detections.json", _coco_style(per_top[n], dataset.classes))
        logging.getLogger(voc_eval.__name__).addFilter(quiet)
        try:
            ev = voc_eval.evaluate_detections(dataset, dets, dataset.classes)
        finally:
            logging.getLogger(voc_eval.__name__).removeFilter(quiet)
        m = float(np.mean([ev["ap"][c] for c in present])) if present else float("nan")
        res = {"mAP": m, "ap": ev["ap"], "mAP_all": ev["mAP"], "classes_evaluated": present,
               "num_images": num_images, "avg_proposals": n_props[n] / n_img,
               "num_detections": int(sum(len(v[1]) for v in per_top[n].values()))}
        write_json(d / "metrics.json", res, indent=1)
        results[n] = res
        log.info("top %d proposals: mAP %.4f over %d classes\n%s", n, m, len(present),
                 voc_eval.format_table({"mAP": m, "ap": {c: ev["ap"][c] for c in present}}))
    write_json(out_dir / "results.json", {
        "split": dataset.split, "dataset": dataset.name, "proposals": str(getattr(store, "path", store or "")),
        "mAP": {str(n): results[n]["mAP"] for n in tops},
        "timing_s_per_image": {k: v / n_img for k, v in timing.items()}, "wall_s": wall,
        "per_top": {str(n): results[n] for n in tops}}, indent=1)
    return results


def shard_path(out_dir, shard: tuple[int, int]) -> Path:
    return Path(out_dir) / "shards" / f"detections-{shard[0]}-of-{shard[1]}.json"


def find_shards(out_dir) -> list[Path]:
    """The shard files of one ``--shard I/N`` split in ``out_dir/shards``, ordered by I (DataError if none, or if
    they come from splits with different N)."""
    import re

    found = []
    for f in (Path(out_dir) / "shards").glob("detections-*-of-*.json"):
        m = re.fullmatch(r"detections-(\d+)-of-(\d+)\.json", f.name)
        if m:
            found.append((int(m.group(2)), int(m.group(1)), f))
    if not found or len({n for n, _, _ in found}) != 1:
        raise DataError(f"{Path(out_dir) / 'shards'}: expected the detection shards of one --shard I/N split, found "
                        f"{sorted(f.name for _, _, f in found) or 'none'}")
    return [f for _, _, f in sorted(found)]


def _write_shard(out_dir, shard, tops, dataset, store, per_top, num_proposals, timing, wall) -> Path:
    """One shard's detections, exactly (float32 -> JSON doubles -> float32 round-trips), per N and image."""
    path = shard_path(out_dir, shard)
    write_json(path, {
        "shard": list(shard), "tops": tops, "dataset": dataset.name, "split": dataset.split,
        "proposals": str(getattr(store, "path", "")), "num_proposals": num_proposals, "timing": timing, "wall_s": wall,
        "per_top": {str(n): {iid: [b.tolist(), s.tolist(), lab.tolist()] for iid, (b, s, lab) in d.items()}
                    for n, d in per_top.items()}})
    log.info("wrote the detections of %d images to %s", len(num_proposals), path)
    return path


def evaluate_shards(shard_files, dataset, out_dir, store=None) -> dict:
    """Merge the detection shards of :func:`test_detector` (``shard=``) and evaluate them as one run: images in the
    split's order, a duplicate (DistributedSampler padding) keeps its first copy; every image of ``dataset`` must be
    in some shard. Writes the same files as an unsharded run and returns its results."""
    shards = [read_json(f) for f in shard_files]
    if not shards:
        raise DataError("no detection shards to merge")
    ref = shards[0]
    for f, sh in zip(shard_files, shards):
        for k in ("tops", "dataset", "split", "proposals"):
            if sh.get(k) != ref.get(k):
                raise DataError(f"{f}: shard differs from {shard_files[0]} in '{k}'")
    if ref["dataset"] != dataset.name or ref["split"] != dataset.split:
        raise DataError(f"{shard_files[0]}: detections of {ref['dataset']} split '{ref['split']}', not "
                        f"{dataset.name} split '{dataset.split}'")
    tops = [int(n) for n in ref["tops"]]
    num_proposals: dict[str, int] = {}
    found: dict[int, dict] = {n: {} for n in tops}
    for sh in shards:
        for iid, r in sh["num_proposals"].items():
            if iid in num_proposals:
                continue  # padding duplicate: keep the first copy
            num_proposals[iid] = int(r)
            for n in tops:
                b, s, lab = sh["per_top"][str(n)][iid]
                found[n][iid] = (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(s, np.float32),
                                 np.asarray(lab, np.int64))
    ids = list(dataset.image_ids)
    missing = [i for i in ids if i not in num_proposals]
    if missing:
        raise DataError(f"{len(missing)} images of {dataset.split} are in no detection shard (first: {missing[0]}); "
                        f"run every shard I/{len(shards)} first")
    per_top = {n: {i: found[n][i] for i in ids} for n in tops}
    n_props = {n: sum(min(n, num_proposals[i]) for i in ids) for n in tops}
    timing = {k: sum(sh["timing"][k] for sh in shards) for k in ref["timing"]}
    wall = max(sh["wall_s"] for sh in shards)
    empty = sum(1 for i in ids if num_proposals[i] == 0)
    if store is None:
        store = ref["proposals"]
    return _evaluate(dataset, store, tops, out_dir, per_top, n_props, timing, wall, len(ids), empty)


class _DropAbsentClassWarnings(logging.Filter):
    """voc_eval warns once per class without ground truth per call; we say it once above instead."""

    def filter(self, record):
        return "has no non-difficult ground truth" not in record.getMessage()


def _coco_style(per_image: dict, classes) -> list[dict]:
    out = []
    for iid, (b, s, lab) in per_image.items():
        for box, score, c in zip(b.tolist(), s.tolist(), lab.tolist()):
            out.append({"image_id": iid, "category_id": int(c) + 1, "category": classes[int(c)],
                        "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                 round(box[3] - box[1], 2)], "score": round(float(score), 6)})
    return out


test_detector.__test__ = False  # not a pytest test, despite the name
