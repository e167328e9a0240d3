"""DeepMask training (paper §3.2, §3.4): SGD on the loss of eq. (1) over patches from proposals/deepmask/sampler.py.

Loss, eq. (1): L = sum_k [ (1 + y_k) / (2 w^o h^o) sum_ij log(1 + exp(-m_k^ij f_segm^ij(x_k)))
                          + lambda log(1 + exp(-y_k f_score(x_k))) ],  lambda = 1/32.
The mask term is a per-pixel MEAN (the 1/(w^o h^o) normaliser) taken, as §3.4 says, after the fixed bilinear
upsampling of the 56x56 output to the patch resolution (224x224) where the ground truth lives ("a final bilinear
upsampling layer is added to transform the 56x56 output prediction to the full 224x224 resolution of the
ground-truth"; downsampling the ground truth instead "slightly reduced accuracy"). So we average over the P x P
upsampled pixels: mean, not sum, keeps the paper's balance between the two terms (a sum over 224^2 pixels divided
by 56^2 would weight the mask term 16x more); it is also what the official code does (SoftMarginCriterion averages
over pixels; its mask gradients are scaled by the batch size, i.e. a sum over the batch, and the score term is
averaged, i.e. lambda = 1/batch = 1/32). The factor (1 + y_k)/2 keeps the mask term for positives only. The batch
loss is the SUM over the batch, as eq. (1) (with lr 1e-3, as the paper).

Batches (§3.2 "we alternate between backpropagating through the segmentation branch and scoring branch"):
``batch_mode: alternate`` (default) -- even iterations are mask batches (all positives, mask term only), odd ones
score batches (1:1, score term only); ``joint`` -- every batch is 1:1 and both terms are used.

Checkpoints (core.io.atomic_torch_save) every ``checkpoint_every`` iterations and at the end: ``last.pt`` (model,
optimizer, iteration, config, RNG states of torch / numpy / python, sampler state (seed, next batch)) resumes
EXACTLY -- the same numbers as an uninterrupted run; ``best.pt`` is the best by validation (mean of the mask IoU at
the binarisation threshold and the score accuracy, on fixed seeded held-out patches); the resolved config is saved
beside as ``config.yaml``; validation history in ``metrics.json``.

Under ``torchrun`` (core/distributed.py): DistributedDataParallel (gradients averaged over ranks), rank r takes every
world-th batch of the global batch stream (sampler.PatchStream), ``lr_scaling: linear`` multiplies lr by the world
size, losses are averaged over ranks for the progress bar, rank 0 alone validates and writes checkpoints (the others
wait at a barrier), and ``last.pt`` also holds every rank's RNG state and the replicas' state hashes.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core import distributed
from core.backbones import upgrade_state_dict
from core.config import DM_TRAIN, Config, values_for
from core.errors import CheckpointError, ConfigError, DataError
from core.io import load_checkpoint
from core.training import CheckpointFiles, Training, check_identity, make_loader

from .model import DeepMask, build_deepmask, upsample_masks
from .sampler import PatchSampler, PatchStream, SamplerParams, pad_rgb_for
from .sources import load_records, split_holdout

log = logging.getLogger(__name__)

__all__ = ["deepmask_loss", "batch_loss", "to_input", "train_deepmask", "evaluate", "build_samplers"]

# ------------------------------------------------------------------------------------------------ loss
def deepmask_loss(mask_logits: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  kind: str, score_weight: float, patch_size: int) -> tuple[torch.Tensor, dict]:
    """Eq. (1) on one batch (see the module docstring). ``kind``: 'mask' (mask term only), 'score' (score term
    only) or 'joint' (both). Returns (loss, stats) with per-sample means in stats for logging."""
    pos = labels > 0
    stats = {}
    loss = scores.new_zeros(())
    if kind in ("mask", "joint"):
        n_pos = int(pos.sum())
        if n_pos:
            # Only positives enter the mask term: (1 + y_k)/2 = 0 for negatives, so their masks are never read.
            up = upsample_masks(mask_logits[pos], patch_size)  # fixed bilinear upsampling to P x P (§3.4)
            target = masks[pos].to(up.dtype) * 2 - 1  # m_k^ij in {+-1}
            per_sample = F.softplus(-target * up).mean(dim=(1, 2))  # log(1 + exp(-m f)), mean over pixels
            loss = loss + per_sample.sum()
            stats["mask_loss"] = float(per_sample.detach().mean())
    if kind in ("score", "joint"):
        s = F.softplus(-labels * scores)
        loss = loss + score_weight * s.sum()
        stats["score_loss"] = float(s.detach().mean())
        stats["score_acc"] = float(((scores.detach() > 0) == pos).float().mean())
    return loss, stats


# ------------------------------------------------------------------------------------------------ data
def build_samplers(cfg: Config, pad_rgb) -> tuple[PatchSampler, PatchSampler]:
    """Train and validation samplers from cfg.deepmask.train_sets / val_sets (val: held-out train images when
    val_sets is empty)."""
    dm = cfg.deepmask
    if not dm.train_sets:
        raise DataError("config key 'deepmask.train_sets' is empty: list COCO instance-mask sets as "
                        "{ann: instances.json, images: folder} (or use data.synthetic=true in the experiment)")
    train = load_records(dm.train_sets, dm.categories)
    if dm.val_sets:
        val = load_records(dm.val_sets, dm.categories)
    else:
        train, val = split_holdout(train, dm.val_fraction, cfg.seed)
        log.info("deepmask: no val_sets; holding out %d of %d training images for validation", len(val),
                 len(train) + len(val))
        if not val:
            raise DataError("deepmask: no validation images (set deepmask.val_sets, or give more than one "
                            "training image)")
    params = SamplerParams.from_config(dm, pad_rgb)
    shares = [src.share for src in dm.train_sets]  # held-out validation images keep the training mix
    return (PatchSampler(train, params, seed=cfg.seed, name="train", shares=shares),
            PatchSampler(val, params, seed=cfg.seed + 1_000_003, name="val", shares=() if dm.val_sets else shares))


def fixed_val_batches(sampler: PatchSampler, n: int) -> list[dict]:
    """``n`` seeded 1:1 batches (fixed for a given config: the same patches at every validation)."""
    return [sampler.batch(t, kind="joint") for t in range(max(1, n))]


def to_input(model: DeepMask, images: torch.Tensor, device) -> torch.Tensor:
    """A batch of uint8 (B,H,W,3) patches as the model's normalised float input on ``device``."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return model.normalize(x)


@torch.no_grad()
def evaluate(model: DeepMask, batches: list[dict], device, threshold: float, score_weight: float) -> dict:
    """Mean mask IoU of the positives (sigmoid of the upsampled mask > threshold vs the ground truth), score
    accuracy (score > 0 <=> positive), and the two loss terms, on fixed batches; eval mode."""
    was_training = model.training
    model.eval()
    ious, correct, n, mask_l, score_l = [], 0, 0, [], []
    logit_thr = math.log(threshold / (1 - threshold))
    for b in batches:
        x = to_input(model, b["images"], device)
        labels = b["labels"].to(device)
        masks = b["masks"].to(device)
        mk, sc = model(x)
        _, st = deepmask_loss(mk, sc, masks, labels, "joint", score_weight, model.patch_size)
        mask_l.append(st.get("mask_loss", 0.0))
        score_l.append(st["score_loss"])
        pos = labels > 0
        if pos.any():
            pred = upsample_masks(mk[pos], model.patch_size) > logit_thr
            gt = masks[pos]
            inter = (pred & gt).flatten(1).sum(1).float()
            union = (pred | gt).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).cpu())
        correct += int(((sc > 0) == pos).sum())
        n += len(labels)
    model.train(was_training)
    iou = float(torch.cat(ious).mean()) if ious else 0.0
    acc = correct / max(n, 1)
    return {"mask_iou": iou, "score_acc": acc, "mask_loss": float(np.mean(mask_l)), "score_loss":
            float(np.mean(score_l)), "val_metric": 0.5 * (iou + acc)}


# ------------------------------------------------------------------------------------------------ checkpoints
def training_identity(cfg: Config) -> dict:
    """What a checkpoint must share with the config resuming it: the fields that affect DeepMask's training
    (core/config.py metadata) except the resumable ones (iters, val_every), and the seed."""
    ident = values_for(cfg, DM_TRAIN, section="deepmask", resumable=False)
    ident["seed"] = cfg.seed
    return ident


def _check_resumable(ckpt: dict, cfg: Config, path: Path) -> None:
    from core.config import from_dict

    try:  # fields added to the config since the checkpoint was written take their defaults
        old = training_identity(from_dict(ckpt.get("config") or {}))
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not load ({e})") from None
    check_identity(path, old, training_identity(cfg))


def checkpoint_files(out_dir) -> CheckpointFiles:
    """A DeepMask training folder's checkpoints: ``last.pt`` (resumes) and ``best.pt`` (best by validation)."""
    return CheckpointFiles(out_dir, "last.pt", best="best.pt")


def _lr_at(dm, it: int) -> float:
    return dm.lr * dm.gamma ** sum(1 for s in dm.lr_steps if it >= s)


# ------------------------------------------------------------------------------------------------ training
def batch_loss(model: DeepMask, dm, device):
    """The loss of one training batch (sampler.PatchSampler.batch), ``(net, batch) -> (loss, stats)`` for
    :class:`core.training.TrainStep`; ``net`` is ``model`` or its DistributedDataParallel wrapper."""
    def loss_fn(net, batch):
        mk, sc = net(to_input(model, batch["images"], device))
        loss, st = deepmask_loss(mk, sc, batch["masks"].to(device), batch["labels"].to(device), batch["kind"],
                                 dm.score_weight, dm.patch_size)
        if net is not model and not loss.requires_grad:  # DDP: every rank must join the backward
            loss = loss + 0.0 * (mk.sum() + sc.sum())
        return loss, st

    return loss_fn


class _RunningStats:
    """Running means of the batch losses over the global batch, shown on the progress bar."""

    def __init__(self):
        self.run, self.t0, self.n = {}, time.time(), 0

    def __call__(self, it, batch, loss, st, bar):
        self.n += len(batch["labels"])
        st = distributed.reduce_for_logging(st, mean_keys=sorted(st))  # global batch (same keys on all ranks)
        for k, v in st.items():
            self.run[k] = v if k not in self.run else 0.95 * self.run[k] + 0.05 * v
        bar.set_postfix({**{k: f"{v:.3f}" for k, v in self.run.items()},
                         "patch/s": f"{self.n / max(time.time() - self.t0, 1e-9):.1f}"}, refresh=False)


def train_deepmask(cfg: Config, out_dir, progress: bool = True, resume: bool = True) -> dict:
    """Train (or resume, or skip when finished) DeepMask into ``out_dir``. Returns {'best': path, 'last': path,
    'iteration': int, 'metrics': last validation}."""
    dm = cfg.deepmask
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoint_files(out_dir)
    last_path, best_path = ckpts.path(0), ckpts.best
    run = Training(cfg, "deepmask", ckpts, history_file="metrics.json", progress=progress, desc="deepmask",
                   what="deepmask training")
    # §3.4: plain SGD, lr 1e-3, momentum 0.9, weight decay 5e-5 on every parameter.
    model = run.setup(build_deepmask(dm), lambda m, mult: torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad], lr=dm.lr, momentum=dm.momentum, weight_decay=dm.weight_decay))

    def result():
        return {"best": str(best_path), "last": str(last_path), "iteration": run.start,
                "metrics": run.history[-1] if run.history else {}}

    if resume and run.resume(lambda ck, path: _check_resumable(ck, cfg, path)) is not None:
        if run.start >= dm.iters and best_path.is_file():
            log.info("deepmask: %s is complete (%d iterations); nothing to do", out_dir, run.start)
            return result()
    run.save_config()

    pad = pad_rgb_for(dm.pad_color, model.trunk.mean)
    train_sampler, val_sampler = build_samplers(cfg, pad)
    val_batches = fixed_val_batches(val_sampler, dm.val_batches) if run.main else []  # rank 0 validates
    log.info("deepmask: %d training positives in %d images; %d validation patches; trunk %s; %.1fM parameters",
             len(train_sampler), len(train_sampler.records), sum(len(b["labels"]) for b in val_batches), dm.trunk,
             sum(p.numel() for p in model.parameters()) / 1e6)

    # alternate batches train one branch each: DDP must allow parameters without gradient
    net = run.wrap(find_unused_parameters=dm.batch_mode != "joint")
    model.train()
    if run.start < dm.iters:
        loader = make_loader(PatchStream(train_sampler, run.start, distributed.rank(), distributed.world_size()),
                             dm.workers, cfg.seed, batch_size=None, single_threaded_workers=False)

        def before_step(it, batch):
            assert batch["index"] == it, (batch["index"], it)
            for g in run.optimizer.param_groups:
                g["lr"] = _lr_at(dm, it) * run.lr_mult

        def validate(it):
            m = evaluate(model, val_batches, run.device, dm.val_mask_threshold, dm.score_weight)
            log.info("deepmask it %d: val mask IoU %.4f, score acc %.4f (mask loss %.4f, score loss %.4f)",
                     it, m["mask_iou"], m["score_acc"], m["mask_loss"], m["score_loss"])
            return m

        step = run.step(net, batch_loss(model, dm, run.device), describe=lambda b: f"{b['kind']} batch")
        run.loop(loader, step, dm.iters, before_step=before_step, after_step=_RunningStats(), validate=validate,
                 validate_every=dm.val_every, checkpoint_every=dm.checkpoint_every,
                 state=lambda it: {"sampler": {"seed": train_sampler.seed, "next_batch": it}})
        del loader
    return result()


def load_deepmask(checkpoint, device="cpu") -> tuple[DeepMask, Config]:
    """Model (eval mode) and the Config it was trained with, from a checkpoint written by :func:`train_deepmask`."""
    from core.config import from_dict

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{checkpoint}: not a DeepMask checkpoint (needs 'model' and 'config')")
    train_cfg = from_dict(ckpt["config"])
    model = build_deepmask(train_cfg.deepmask, pretrained=False)
    try:
        model.load_state_dict(upgrade_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit the DeepMask of its config ({str(e)[:200]})") from None
    return model.to(device).eval(), train_cfg

