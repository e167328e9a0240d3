"""Fast R-CNN training loop (Girshick, ICCV 2015, Sec. 2.3; fast-rcnn ``tools/train_net.py`` + ``lib/roi_data_layer``).

Minibatches: ``ims_per_batch`` images x ``batch_rois / ims_per_batch`` RoIs (2 x 64), RoIs drawn by
:func:`detector.sampling.sample_rois` (25% fg at IoU >= 0.5, bg in [0.1, 0.5), gt boxes added). Horizontal flips as
in the official code: the image list is duplicated with flipped copies (``imdb.append_flipped_images``) and the
doubled list is shuffled each epoch; image, gt boxes AND proposals of a flipped entry are mirrored together.
One training scale per image drawn from ``scales`` (shorter side, longer side at most ``max_size``).

Loss (paper eq. 1): softmax log loss over all sampled RoIs (mean) + smooth L1 (beta 1) on the class-specific deltas
of the foreground RoIs, summed and divided by the number of RoIs in the minibatch (fast-rcnn SmoothL1Loss layer).
Targets are normalised with fixed stds (0.1, 0.1, 0.2, 0.2) (see detector/sampling.py).

SGD with momentum, weight decay on weights only, biases at 2x lr (fast-rcnn prototxt ``lr_mult: 2, decay_mult: 0``);
lr x gamma at each of ``lr_steps``.

Determinism / exact resume: the data stream is a pure function of (seed, position): the position ``p`` of an
entry in the infinite stream fixes its epoch (a permutation seeded by (seed, epoch)) and its own random generator
(scale choice, RoI sampling) seeded by (seed, p). So workers, their number, and a restart do not change the data, and
a checkpoint only needs the iteration, the model, optimizer and scheduler states, and the RNG states of the main
process (dropout).

Under ``torchrun`` (core/distributed.py): iteration ``it``'s global minibatch is stream positions
``it*B*W .. (it+1)*B*W - 1`` (B = ims_per_batch, W = world size) and rank r takes every W-th of them (positions
``it*B*W + r + k*W``), the split DistributedSampler makes; W = 1 is the single-process stream. The model is wrapped
in DistributedDataParallel (gradients averaged over ranks), ``lr_scaling: linear`` multiplies lr by W, losses are
averaged (RoI counts summed) over ranks for the history, and rank 0 alone writes checkpoints, history and
``final.pt`` (the others wait at a barrier). Checkpoints hold every rank's RNG state (exact resume with the same W).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from core import distributed
from core.config import Config, to_dict
from core.errors import ConfigError, DataError, UserError, is_out_of_memory
from core.images import load_image
from core.io import load_checkpoint
from core.training import CheckpointFiles, Training, check_identity, make_loader

from .model import build_detector
from .sampling import BoxCoder, sample_rois
from .transforms import compute_scale, flip_boxes, flip_image, pad_batch, resize_image, to_tensor

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------- data
def _seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def prepare_sample(image: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, proposals: np.ndarray,
                   flipped: bool, target_size: int, dcfg, mean, std, generator: torch.Generator,
                   coder: BoxCoder | None = None) -> dict:
    """One training entry: flip (image, gt, proposals together), sample RoIs in image coordinates (targets encoded
    by the model's ``coder``, default the one of ``dcfg``), rescale.

    Returns image (3,H',W') normalised tensor, rois (R,4) in rescaled pixels, labels (R,), targets (R,4)."""
    h, w = image.shape[:2]
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
    # degenerate proposals cannot be regressed from (zero width/height)
    proposals = proposals[(proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])]
    if flipped:
        image = flip_image(image)
        gt_boxes = flip_boxes(gt_boxes, w)
        proposals = flip_boxes(proposals, w)
    n_rois = dcfg.batch_rois // dcfg.ims_per_batch
    s = sample_rois(torch.from_numpy(proposals), torch.from_numpy(gt_boxes), torch.as_tensor(gt_labels),
                    n_rois, dcfg.fg_fraction, dcfg.fg_thresh, dcfg.bg_thresh_hi, dcfg.bg_thresh_lo,
                    generator=generator, coder=coder or BoxCoder.from_config(dcfg))
    scale = compute_scale(h, w, target_size, dcfg.max_size)
    img = to_tensor(resize_image(image, scale), mean, std)
    return {"image": img, "rois": s.rois * scale, "labels": s.labels, "targets": s.targets,
            "num_fg": s.num_fg, "scale": scale, "flipped": flipped}


class TrainEntries:
    """The training images (records with usable gt) of a dataset."""

    def __init__(self, dataset, use_difficult: bool = False):
        self.items = []
        skipped = 0
        for rec in dataset:
            keep = np.ones(len(rec.boxes), bool) if use_difficult else ~np.asarray(rec.difficult, bool)
            if not keep.any():
                skipped += 1
                continue
            self.items.append((rec.image_id, rec.path, np.asarray(rec.boxes, np.float32)[keep],
                               np.asarray(rec.labels, np.int64)[keep]))
        if skipped:
            log.info("skipping %d of %d training images without (non-difficult) ground-truth objects",
                     skipped, len(dataset))
        if not self.items:
            raise DataError(f"{getattr(dataset, 'name', 'dataset')} split '{getattr(dataset, 'split', '?')}': "
                            "no training image has a (non-difficult) ground-truth object")
        self.skipped = skipped

    def __len__(self):
        return len(self.items)


class TrainStream(Dataset):
    """Map-style dataset over stream positions (see the module docstring): item ``p`` -> prepared sample."""

    def __init__(self, entries: TrainEntries, store, top: int | None, dcfg, mean, std, seed: int,
                 coder: BoxCoder | None = None):
        self.entries = entries.items
        self._store_arg = store
        self._store = None if isinstance(store, (str, Path)) else store
        self.top = top if top else None
        self.dcfg = dcfg
        self.mean, self.std = tuple(mean), tuple(std)
        self.coder = coder or BoxCoder.from_config(dcfg)
        self.seed = int(seed)
        self.per_epoch = len(self.entries) * (2 if dcfg.flip else 1)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def store(self):
        if self._store is None:  # opened lazily in each worker
            from core.store import ProposalStore

            self._store = ProposalStore.open(self._store_arg)
        return self._store

    def __getstate__(self):
        d = dict(self.__dict__)
        if isinstance(self._store_arg, (str, Path)):
            d["_store"] = None
        d["_perm_cache"] = None
        return d

    def __len__(self):  # positions are unbounded; the sampler decides which ones are read
        return 2**62

    def entry_at(self, pos: int) -> tuple[int, bool]:
        """(image index, flipped) of stream position ``pos``."""
        epoch, k = divmod(int(pos), self.per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng(_seed_of(self.seed, 7919, epoch))
            self._perm_cache = (epoch, rng.permutation(self.per_epoch))
        e = int(self._perm_cache[1][k])
        n = len(self.entries)
        return e % n, e >= n

    def __getitem__(self, pos: int) -> dict:
        idx, flipped = self.entry_at(pos)
        image_id, path, gt_boxes, gt_labels = self.entries[idx]
        gen = torch.Generator().manual_seed(_seed_of(self.seed, 104729, pos))
        scales = self.dcfg.scales
        target = scales[int(torch.randint(len(scales), (1,), generator=gen))] if len(scales) > 1 else scales[0]
        image = load_image(path)
        props = self.store.get(image_id, top=self.top, masks=False).boxes
        out = prepare_sample(image, gt_boxes, gt_labels, props, flipped, target, self.dcfg, self.mean, self.std,
                             gen, self.coder)
        out["image_id"] = image_id
        out["pos"] = int(pos)
        return out


class PositionSampler(Sampler):
    """Yields stream positions ``start, start+step, ...`` below ``stop`` in order (step: the world size when
    distributed)."""

    def __init__(self, start: int, stop: int, step: int = 1):
        self.start, self.stop, self.step = int(start), int(stop), int(step)

    def __iter__(self):
        return iter(range(self.start, self.stop, self.step))

    def __len__(self):
        return len(range(self.start, self.stop, self.step))


def collate(samples: list[dict]) -> dict:
    images = pad_batch([s["image"] for s in samples])
    rois = torch.cat([torch.cat([torch.full((len(s["rois"]), 1), float(i)), s["rois"]], 1)
                      for i, s in enumerate(samples)])
    return {"images": images, "rois": rois, "labels": torch.cat([s["labels"] for s in samples]),
            "targets": torch.cat([s["targets"] for s in samples]),
            "num_fg": sum(s["num_fg"] for s in samples), "image_ids": [s["image_id"] for s in samples],
            "pos": [s["pos"] for s in samples]}


# ------------------------------------------------------------------------------------------------------- loss
def detection_loss(cls_logits, bbox_deltas, labels, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax log loss (mean over RoIs) and smooth L1 (beta 1) over the fg RoIs' class-specific deltas, summed and
    divided by the RoI count (paper eq. 1-3; fast-rcnn SmoothL1Loss normalised by the minibatch size)."""
    n = max(1, labels.numel())
    loss_cls = F.cross_entropy(cls_logits, labels) if labels.numel() else cls_logits.sum() * 0
    fg = torch.nonzero(labels > 0).flatten()
    if fg.numel():
        deltas = bbox_deltas.view(bbox_deltas.shape[0], -1, 4)[fg, labels[fg]]
        loss_box = F.smooth_l1_loss(deltas, targets[fg], beta=1.0, reduction="sum") / n
    else:
        loss_box = bbox_deltas.sum() * 0
    return loss_cls, loss_box


def build_optimizer(model: torch.nn.Module, dcfg) -> torch.optim.Optimizer:
    """SGD; biases get ``bias_lr_factor`` x lr and ``bias_weight_decay`` (fast-rcnn: lr_mult 2, decay_mult 0)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith(".bias") else weights).append(p)
    groups = [{"params": weights, "lr": dcfg.lr, "weight_decay": dcfg.weight_decay},
              {"params": biases, "lr": dcfg.lr * dcfg.bias_lr_factor, "weight_decay": dcfg.bias_weight_decay}]
    return torch.optim.SGD(groups, lr=dcfg.lr, momentum=dcfg.momentum)


# ------------------------------------------------------------------------------------------------------- identity
def _train_fields(dcfg_or_cfg) -> dict:
    """The detector fields that change what is trained, except the resumable ones (iters): from the fields'
    metadata in core/config.py (test-time and bookkeeping settings are not among them)."""
    from core.config import DET_TRAIN, values_for

    return {k.split(".", 1)[1]: v for k, v in
            values_for(dcfg_or_cfg, DET_TRAIN, section="detector", resumable=False).items()}


def _identity(cfg: Config, store_path: str, top: int | None, classes) -> dict:
    """What must match between a checkpoint and the run resuming it."""
    return {"detector": _train_fields(cfg), "seed": cfg.seed,
            "voc": str(Path(cfg.data.voc).resolve()) if cfg.data.voc else "",
            "train_split": cfg.data.train_split, "proposals": str(Path(store_path).resolve()), "top": top,
            "classes": list(classes)}


def _with_new_defaults(old: dict | None) -> dict:
    """A checkpoint's identity in today's terms: training fields added to the config since it was written take
    their defaults, and fields that no longer count (test-time settings an older version compared) are dropped,
    so neither makes an older checkpoint unresumable."""
    from core.config import Config

    old = dict(old or {})
    det = dict(old.get("detector") or {})
    old["detector"] = {k: det.get(k, v) for k, v in _train_fields(Config()).items()}
    return old


def checkpoint_files(out_dir) -> CheckpointFiles:
    """A detector training folder's checkpoints: ``ckpt_<iteration>.pt``, the newest kept."""
    return CheckpointFiles(out_dir, "ckpt_{}.pt")



# ------------------------------------------------------------------------------------------------------- loop
@contextlib.contextmanager
def _name_out_of_memory(batch: dict, it: int, dcfg):
    """Out of memory in a training step -> a UserError naming the iteration, the images and the settings."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        images = batch["images"]
        raise UserError(f"iteration {it}: out of memory ({type(e).__name__}) on images {batch['image_ids']} "
                        f"(batch {images.shape[3]}x{images.shape[2]} px); lower detector.max_size (now "
                        f"{dcfg.max_size}) or detector.scales (now {dcfg.scales}), or detector.ims_per_batch / "
                        "detector.batch_rois") from None


def batch_loss(device):
    """The loss of one collated minibatch (:func:`collate`), ``(net, batch) -> (loss, stats)``, for
    :class:`core.training.TrainStep`."""
    def loss_fn(net, batch):
        images = batch["images"].to(device, non_blocking=True)
        cls_logits, deltas = net(images, batch["rois"].to(device))
        loss_cls, loss_box = detection_loss(cls_logits, deltas, batch["labels"].to(device),
                                            batch["targets"].to(device))
        return loss_cls + loss_box, {"loss_cls": loss_cls, "loss_box": loss_box}

    return loss_fn


class _History:
    """Per-iteration records (over the global minibatch), and every ``log_every`` iterations a history entry: their
    means since the previous entry (single-minibatch losses are noisy) and the images per second."""

    MEANS = ("loss", "loss_cls", "loss_box", "num_rois", "num_fg", "fc6_active")

    def __init__(self, run: Training, stop: int):
        self.run, self.stop = run, stop
        self.every = max(1, run.scfg.log_every)
        self.losses, self.window = [], []
        self.t0, self.n_img = time.time(), 0

    def __call__(self, it, batch, loss, stats, bar):
        model, history = self.run.model, self.run.history
        self.n_img += batch["images"].shape[0]
        rec = {"iter": it, "loss": loss.item(), "loss_cls": stats["loss_cls"].item(),
               "loss_box": stats["loss_box"].item(), "num_rois": int(batch["labels"].numel()),
               "num_fg": int(batch["num_fg"]), "fc6_active": float(getattr(model, "fc6_active", float("nan"))),
               "lr": self.run.optimizer.param_groups[0]["lr"]}
        rec = distributed.reduce_for_logging(rec, mean_keys=("loss", "loss_cls", "loss_box"),
                                             sum_keys=("num_rois", "num_fg"))
        self.losses.append(rec)
        self.window.append(rec)
        if it % self.every == 0 or it == self.stop:
            dt = time.time() - self.t0
            mean = {k: float(np.mean([r[k] for r in self.window])) for k in self.MEANS}
            history.append(dict(rec, **mean, images_per_s=self.n_img / max(dt, 1e-9), window=len(self.window)))
            self.t0, self.n_img, self.window = time.time(), 0, []
            log.debug("iter %d: %s", it, history[-1])
        bar.set_postfix(loss=f"{rec['loss']:.3f}", cls=f"{rec['loss_cls']:.3f}", box=f"{rec['loss_box']:.3f}",
                        ims=f"{history[-1]['images_per_s']:.1f}/s" if history else "-")


def train_detector(cfg: Config, store, dataset, out_dir, top: int | None = None,
                   stop_after: int | None = None, progress: bool = True) -> dict:
    """Train Fast R-CNN on ``dataset`` with proposals from ``store`` (a ProposalStore path), writing checkpoints
    ``ckpt_<iter>.pt`` every ``checkpoint_every`` iterations, ``history.json`` and ``final.pt`` into ``out_dir``.

    Resumes exactly from the latest checkpoint in ``out_dir`` (same training fields, see :func:`_identity`). ``top``:
    proposals per image (default ``cfg.detector.train_top``; 0 = all). ``stop_after``: stop (with a checkpoint)
    after this iteration, as if interrupted (tests). Returns {'final': path|None, 'iteration': int,
    'losses': [per-iteration dicts of this call]}."""
    dcfg = cfg.detector
    out_dir = Path(out_dir)
    top = dcfg.train_top if top is None else top
    top = int(top) if top else None
    if dcfg.ims_per_batch < 1 or dcfg.batch_rois < dcfg.ims_per_batch:
        raise ConfigError("detector.batch_rois must be >= detector.ims_per_batch >= 1")
    if not dcfg.scales:
        raise ConfigError("detector.scales: at least one training scale is needed")
    from core.store import ProposalStore

    store_obj = ProposalStore.open(store) if isinstance(store, (str, Path)) else store
    store_obj.check(dataset.name, dataset.split)
    store_path = getattr(store_obj, "path", store)
    ident = _identity(cfg, str(store_path), top, dataset.classes)

    final = out_dir / "final.pt"
    if final.is_file():
        ck = load_checkpoint(final)
        if _with_new_defaults(ck.get("identity")) == ident and ck.get("iteration") == dcfg.iters:
            log.info("%s exists for this config; training skipped", final)
            return {"final": str(final), "iteration": dcfg.iters, "losses": []}

    run = Training(cfg, "detector", checkpoint_files(out_dir), progress=progress, desc="train fast-rcnn")
    model = run.setup(
        build_detector(dcfg, len(dataset.classes)),
        lambda m, mult: build_optimizer(m, dataclasses.replace(dcfg, lr=dcfg.lr * mult) if mult != 1 else dcfg),
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(dcfg.lr_steps), gamma=dcfg.gamma))
    run.resume(lambda ck, path: check_identity(path, _with_new_defaults(ck.get("identity")), ident))
    run.save_config()

    entries = TrainEntries(dataset, dcfg.use_difficult)
    stream = TrainStream(entries, store_path, top, dcfg, model.mean, model.std, cfg.seed, model.box_coder)
    stop = dcfg.iters if stop_after is None else min(dcfg.iters, int(stop_after))
    B = dcfg.ims_per_batch
    log.info("training Fast R-CNN (%s) on %d images (%d entries/epoch with flips), iterations %d -> %d, "
             "%d images x %d RoIs, top %s proposals", dcfg.trunk, len(entries), stream.per_epoch, run.start, stop, B,
             dcfg.batch_rois // B, top or "all")
    norm = [list(model.trunk.mean), list(model.trunk.std)]
    kept = {"classes": list(dataset.classes), "identity": ident, "trunk_norm": norm}

    history = _History(run, stop)
    if run.start < stop:
        W, r = distributed.world_size(), distributed.rank()
        # rank r: every W-th position of the global stream (W = 1: start*B .. stop*B-1)
        loader = make_loader(stream, dcfg.workers, cfg.seed, batch_size=B, collate_fn=collate,
                             sampler=PositionSampler(run.start * B * W + r, stop * B * W, W))
        model.train()
        step = run.step(run.wrap(), batch_loss(run.device), guard=lambda b, it: _name_out_of_memory(b, it, dcfg),
                        describe=lambda b: f"images {b['image_ids']}")
        run.loop(loader, step, stop, after_step=history, checkpoint_every=max(1, dcfg.checkpoint_every),
                 state=lambda it: kept)

    if run.start >= dcfg.iters:
        run.write_final(final, {"model": model.state_dict(), "iteration": run.start, "config": to_dict(cfg), **kept})
        return {"final": str(final), "iteration": run.start, "losses": history.losses}
    return {"final": None, "iteration": run.start, "losses": history.losses}
